"""The text tower of image-text models, and its tokenizer.

`TextTransformer` is the CLIP text encoder (style "clip": causal attention, the pooled
vector is the final-LayerNorm state at the end-of-text token) or SigLIP's (style
"siglip": bidirectional attention, the pooled vector is the last position's state
through a dense head). Both load Hugging Face weights one-to-one (`mlx_med.vision.hf`).
There is no padding mask: SigLIP attends over the padded length by design, and in the
causal CLIP tower padding comes after the end token, so it cannot change the pooled
vector (HF's optional attention_mask changes only the states after the end token).

`TextTokenizer` reads a `tokenizer.json` (CLIP's own, or one made by
`train_text_tokenizer` from local text) and returns fixed-length id arrays, the
shape the towers and the data loader want. The rules follow the HF processors:
clip: <|startoftext|> text <|endoftext|>, truncation keeps the end token, padding
with the pad id (CLIP's HF tokenizer pads with <|endoftext|>, which is why the tower
pools at the *first* end token); siglip: the tokenizer's ids, padded to the length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.vision.common import ACTIVATIONS, Encoder, LayerNorm, as_dtype
from mlx_med.vision.vit import _fields_from_mapping

_STYLES = ("clip", "siglip")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


class TextOutput(NamedTuple):
  """pooled: [B, D] (clip: width; siglip: projection_size); tokens: [B, L, width] after the final LayerNorm."""

  pooled: jax.Array
  tokens: jax.Array


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Architecture and numerics of one text tower. Hashable (a static jit argument).

  context_length: the size of the position table (HF max_position_embeddings); inputs
    may be shorter.
  eos_token_id: clip style pools at the first occurrence of this id (HF's rule; for
    the legacy value 2 in old OpenAI configs, at the largest id, as HF does).
  projection_size: siglip style's dense head output (None = width); unused by clip.
  """

  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  style: str = "clip"
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  pad_token_id: int = 49407
  projection_size: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.style not in _STYLES:
      raise ValueError(f"text style {self.style!r} is not one of {_STYLES}")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"text act {self.act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)

  @property
  def output_dim(self) -> int:
    if self.style == "siglip":
      return self.projection_size or self.width
    return self.width

  @classmethod
  def medimageinsight(cls, **overrides) -> TextConfig:
    """MedImageInsight's text encoder: CLIP-style, width 1024, 16 layers, 16 heads, context 77 (~252M)."""
    values = {"vocab_size": 49408, "context_length": 77, "width": 1024, "depth": 16, "num_heads": 16, "mlp_dim": 4096,
                  "style": "clip", "act": "quick_gelu"}
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_config(cls, cfg) -> TextConfig:
    """From an ml_collections ConfigDict / mapping with the same field names (unknown keys are an error)."""
    return cls(**_fields_from_mapping(cls, dict(cfg), "text"))

  def num_params(self) -> int:
    d = self.width
    block = 4 * d * d + 4 * d + 2 * d * self.mlp_dim + self.mlp_dim + d + 4 * d
    total = self.depth * block + (self.vocab_size + self.context_length) * d + 2 * d
    if self.style == "siglip":
      total += d * self.output_dim + self.output_dim
    return total


def pool_positions(token_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the pooled position per row: the first `eos_token_id` (HF CLIP's rule).

  A row without that id pools at position 0 (as argmax of an all-false row does in HF).
  The legacy id 2 (old OpenAI configs) means "the largest id", which was the end token.
  """
  if eos_token_id == 2:
    return jnp.argmax(token_ids, axis=-1)
  return jnp.argmax((token_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
  """token_ids [B, L] int32 (L <= context_length) -> TextOutput."""

  cfg: TextConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, token_ids: jax.Array, *, train: bool = False) -> TextOutput:
    del train  # no dropout in this encoder
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    if token_ids.ndim != 2 or token_ids.shape[1] > cfg.context_length:
      raise ValueError(f"text tower expects token ids [B, L] with L <= {cfg.context_length}; got {token_ids.shape}")
    b, length = token_ids.shape
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=pdtype,
                     embedding_init=logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="token_embed")
    if self.rules is None:
      x = embed(token_ids)
    else:
      # As in the decoder: gather the table's embed dim first so each vocab shard looks
      # up its own ids (otherwise the partitioner replicates the whole gather).
      table = sharding_lib.constrain(self.rules, embed.embedding, ("vocab", None))
      x = jnp.take(table, token_ids, axis=0).astype(dtype)
    pos = self.param("pos_embedding", logical_init(nn.initializers.normal(0.01), (None, "embed")),
                     (cfg.context_length, cfg.width), pdtype)
    x = x + pos[:length].astype(dtype)[None]
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    mask = None
    if cfg.style == "clip":
      causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
      mask = jnp.broadcast_to(causal, (b, length, length))
    x = Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.act, cfg.layer_norm_eps, dtype, pdtype, cfg.remat,
                self.rules, name="encoder")(x, mask)
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, "final_norm")(x)
    if cfg.style == "clip":
      idx = pool_positions(token_ids, cfg.eos_token_id)
      pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    else:
      pooled = nn.DenseGeneral(
          cfg.output_dim, dtype=dtype, param_dtype=pdtype,
          kernel_init=logical_init(nn.initializers.xavier_uniform(), ("embed", "mlp")),
          bias_init=logical_init(nn.initializers.zeros, ("mlp",)), dot_general=cpu_dense_dot_general,
          name="head")(x[:, -1])
    return TextOutput(pooled=pooled, tokens=x)


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


class TextTokenizer:
  """A `tokenizers` tokenizer.json that encodes a batch of texts to [B, context_length] int32."""

  def __init__(self, tokenizer: Any, *, context_length: int = 77, style: str = "clip",
               pad_token: str | None = None, path: str | None = None):
    if style not in _STYLES:
      raise ValueError(f"tokenizer style {style!r} is not one of {_STYLES}")
    if context_length < 2:
      raise ValueError(f"context_length={context_length} must be at least 2 (start and end tokens)")
    self.tokenizer = tokenizer
    self.context_length = int(context_length)
    self.style = style
    self.path = path
    where = path or "the tokenizer"
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if style == "clip":
      self.bos_token_id = self._require(BOS_TOKEN, where)
      self.eos_token_id = self._require(EOS_TOKEN, where)
      probe = tokenizer.encode("", add_special_tokens=True).ids
      # CLIP's tokenizer.json adds <|startoftext|> / <|endoftext|> in its post-processor;
      # a bare BPE file does not, and then we add them here.
      self._wrap = probe != [self.bos_token_id, self.eos_token_id]
    else:
      self.bos_token_id = None
      eos = next((t for t in ("</s>", EOS_TOKEN) if tokenizer.token_to_id(t) is not None), None)
      if eos is None:
        raise ValueError(f"{where}: no end token ('</s>' or '{EOS_TOKEN}') in the vocabulary")
      self.eos_token_id = tokenizer.token_to_id(eos)
      self._wrap = False
    if pad_token is not None:
      self.pad_token_id = self._require(pad_token, where)
    else:
      self.pad_token_id = self.eos_token_id  # HF CLIPTokenizer and SiglipTokenizer pad with the end token

  def _require(self, token: str, where: str) -> int:
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{where}: special token {token!r} is not in the vocabulary; "
                       "a CLIP-style tokenizer.json must define <|startoftext|> and <|endoftext|>")
    return token_id

  @classmethod
  def from_file(cls, path: str | os.PathLike, context_length: int = 77, style: str = "clip",
                pad_token: str | None = None) -> TextTokenizer:
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist (expected a Hugging Face tokenizer.json)")
    try:
      tokenizer = Tokenizer.from_file(path)
    except Exception as e:
      raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return cls(tokenizer, context_length=context_length, style=style, pad_token=pad_token, path=path)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str] | str) -> np.ndarray:
    """texts -> int32 [B, context_length] (a single string is a batch of one)."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length
    out = np.full((len(texts), length), self.pad_token_id, np.int32)
    for row, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=True)):
      ids = list(enc.ids)
      if self._wrap:
        ids = [self.bos_token_id] + ids + [self.eos_token_id]
      if len(ids) > length:
        # Keep the end token (the clip tower pools there; HF truncates content, not specials).
        ids = ids[:length - 1] + [self.eos_token_id] if ids[-1] == self.eos_token_id else ids[:length]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return text.replace("</w>", " ").strip() if self.style == "clip" else text


def train_text_tokenizer(texts: Sequence[str], vocab_size: int, path: str | os.PathLike, *, style: str = "clip",
                         context_length: int = 77) -> TextTokenizer:
  """Trains a byte-level BPE on `texts` with CLIP's pipeline and writes `path` (tokenizer.json).

  The pipeline is CLIP's: NFC, whitespace collapsed, lowercase; words split by CLIP's
  regex then mapped to bytes; BPE with the end-of-word suffix "</w>"; <|startoftext|> and
  <|endoftext|> added around every text. Every byte and every byte + "</w>" is in the
  vocabulary, so no text maps to an unknown token; the final vocabulary can therefore
  exceed `vocab_size` by up to 512 (`TextTokenizer.vocab_size` says the actual size).
  """
  from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  from tokenizers.models import BPE

  path = os.fspath(path)
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_text_tokenizer needs at least one non-empty text")

  def pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
  draft = pipeline(Tokenizer(BPE(end_of_word_suffix="</w>")))
  draft.train_from_iterator(texts, trainer=trainer)
  model = json.loads(draft.to_str())["model"]
  vocab: dict[str, int] = dict(model["vocab"])
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  for symbol in sorted(alphabet) + sorted(ch + "</w>" for ch in alphabet):
    if symbol not in vocab:
      vocab[symbol] = len(vocab)
  # The trainer numbers tokens in an order that varies between runs (hash-map iteration breaks ties
  # between equally frequent merges), so the same texts could give different ids. Renumber: the
  # special tokens first, then every other token by (length, text), a function of the set only.
  specials = [BOS_TOKEN, EOS_TOKEN]
  rest = sorted((t for t in vocab if t not in specials), key=lambda t: (len(t), t))
  vocab = {t: i for i, t in enumerate(specials + rest)}
  # The merge list keeps the trainer's order: merges of equal frequency may swap places between runs,
  # which changes an encoding only where two of them compete for the same symbols of one word.
  tok = pipeline(Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS_TOKEN,
                               continuing_subword_prefix="", fuse_unk=False)))
  tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
  tok.post_processor = processors.RobertaProcessing((EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]),
                                                    trim_offsets=False, add_prefix_space=False)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json", dir=directory)
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return TextTokenizer.from_file(path, context_length=context_length, style=style)
