"""What an RL or SFT run starts from: the policy (decoder, weights, tokenizer) and the questions.

Policy (`config.model`):
  * `path` = a Hugging Face directory (config.json + safetensors + tokenizer files):
    Qwen2/Qwen3/Llama families through `mlx_med.llm`; parameters are placed with the
    mesh's shardings as they are read.
  * `path` = "" : a fresh decoder from `model.decoder` (DecoderConfig fields) with a
    tokenizer from `model.tokenizer_path`, or, when that is empty too, a byte-level BPE
    chat tokenizer trained on the run's own question texts (written to
    `<workdir>/tokenizer`, reused on resume). The vocabulary size comes from the tokenizer.

Questions (`config.data`):
  * `format` = "synthetic": the synthetic verifiable medical MCQA generator
    (`mlx_med.rl.synth`, knowledge base and splits from `data.synthetic`); the
    knowledge base and both splits are written to the workdir (kb.json, train.jsonl,
    heldout.jsonl) so evaluation can reload exactly the held-out questions.
  * `format` = medqa | medmcqa | mmlu_pro (`mlx_med.rl.data` loaders) with `path`;
    held-out questions from `eval_path` (+ `eval_format`, default the same format), or
    else the last `eval_fraction` of a seeded shuffle of `path`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np

from mlx_med.core import params as params_lib
from mlx_med.core.transformer import DecoderConfig

log = logging.getLogger("mlx_med.rl")


@dataclasses.dataclass
class PolicySource:
  """Decoder config, stacked (training-layout) parameters, tokenizer and where its files are."""

  cfg: DecoderConfig
  params: Any
  tokenizer: Any
  tokenizer_dir: str
  hf_config: dict


def load_examples(config: ml_collections.ConfigDict, workdir: str) -> tuple[list, list]:
  """(training questions, held-out questions) as `MCQAExample` lists."""
  from mlx_med.rl import data as data_lib

  d = config.data
  fmt = str(d.format)
  if fmt == "synthetic":
    _, train, held = synthetic_task(d.synthetic, workdir)
    return train, held
  if not str(d.get("path", "")):
    raise ValueError(f"data.format={fmt!r} needs --config.data.path=FILE (or data.format=synthetic)")
  kwargs = {"health_only": bool(d.get("health_only", True))} if fmt == "mmlu_pro" else {}
  train = data_lib.load_mcqa(fmt, str(d.path), **kwargs)
  eval_path = str(d.get("eval_path", ""))
  if eval_path:
    eval_fmt = str(d.get("eval_format", "")) or fmt
    kwargs = {"health_only": bool(d.get("health_only", True))} if eval_fmt == "mmlu_pro" else {}
    return train, data_lib.load_mcqa(eval_fmt, eval_path, **kwargs)
  fraction = float(d.get("eval_fraction", 0.1))
  order = np.random.default_rng(int(config.seed)).permutation(len(train))
  n_eval = int(round(len(train) * fraction))
  held = [train[i] for i in order[:n_eval]]
  rest = [train[i] for i in order[n_eval:]]
  return rest, held


def synthetic_task(s: ml_collections.ConfigDict, workdir: str | None = None) -> tuple[Any, list, list]:
  """(knowledge base, training questions, held-out questions) of the synthetic MCQA task.

  `s` is a `data.synthetic` section (seed, num_diseases, n_train, n_eval, num_options,
  two_hop_fraction); the same section gives the same questions in SFT and RL runs. With a
  workdir, kb.json, train.jsonl and heldout.jsonl are written there (once).
  """
  from mlx_med.rl import data as data_lib
  from mlx_med.rl import synth

  kb = synth.KnowledgeBase.generate(int(s.seed), num_diseases=int(s.num_diseases))
  train, held = synth.make_mcqa_splits(kb, n_train=int(s.n_train), n_eval=int(s.n_eval), seed=int(s.seed),
                                       num_options=int(s.num_options), two_hop_fraction=float(s.two_hop_fraction))
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    kb_path = os.path.join(workdir, "kb.json")
    if not os.path.exists(kb_path):
      kb.save(kb_path)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
      path = os.path.join(workdir, name)
      if not os.path.exists(path):
        data_lib.write_jsonl(rows, path)
  return kb, train, held


def tokenizer_corpus(examples: list) -> list[str]:
  """Texts a fresh tokenizer is trained on: the prompts and reference-style answers of the questions."""
  from mlx_med.rl import data as data_lib

  texts = []
  for ex in examples:
    for template in data_lib.TEMPLATES:
      texts.extend(m["content"] for m in data_lib.build_messages(ex, template))
    texts.extend(ex.options.values())
  return texts


VOCAB_MULTIPLE = 64  # a decoder built from the config pads its embedding table to a multiple of this


def resolve_tokenizer(config: ml_collections.ConfigDict, workdir: str, texts: Callable[[], Iterable[str]]
                      ) -> tuple[Any, str]:
  """(ChatTokenizer, its directory): model.tokenizer_path, else model.path's, else a byte-level BPE
  chat tokenizer trained on `texts()` into <workdir>/tokenizer (reused when it exists: resume)."""
  from mlx_med.llm.tokenizer import ChatTokenizer

  m = config.model
  tokenizer_dir = str(m.get("tokenizer_path", "") or m.get("path", ""))
  if tokenizer_dir:
    return ChatTokenizer.from_dir(tokenizer_dir), tokenizer_dir
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    return ChatTokenizer.from_dir(tokenizer_dir), tokenizer_dir
  from mlx_med.rl.tokenizer import train_chat_tokenizer

  log.info("no model.tokenizer_path: training a %d-token chat tokenizer on the data into %s",
           int(m.tokenizer_vocab_size), tokenizer_dir)
  return train_chat_tokenizer(list(texts()), tokenizer_dir, vocab_size=int(m.tokenizer_vocab_size)), tokenizer_dir


def decoder_config(config: ml_collections.ConfigDict, vocab_size: int, seq_len: int | None = None
                   ) -> tuple[DecoderConfig, dict | None]:
  """The decoder a run trains and the config.json dict it came from (None when built from model.decoder).

  model.path: the Hugging Face directory's architecture; otherwise model.decoder (DecoderConfig
  fields; vocab_size 0 = the tokenizer's rounded up to 64; head_dim 0 = d_model // num_heads;
  max_seq_len 0 = seq_len). Numerics (dtype, param_dtype, remat, attention_backend) from model.*.
  """
  m = config.model
  numerics = {"dtype": str(m.get("dtype", "float32")), "param_dtype": str(m.get("param_dtype", "float32")),
              "remat": str(m.get("remat", "none")), "attention_backend": str(m.get("attention_backend", "xla"))}
  if m.get("path", ""):
    from mlx_med.llm import hf_config as hf_config_lib

    hf = hf_config_lib.read_hf_config(str(m.path))
    max_len = int(m.get("max_seq_len", 0) or 0) or None
    cfg = hf_config_lib.decoder_config_from_hf(hf, scan_layers=True, max_seq_len=max_len, **numerics)
    if seq_len and cfg.max_seq_len < seq_len:
      raise ValueError(f"sequences of {seq_len} tokens exceed the model's max_position_embeddings={cfg.max_seq_len}; "
                       "lower data.seq_len")
    if cfg.vocab_size < vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but {m.path} embeds only {cfg.vocab_size}; "
                       "use the model's own tokenizer (empty model.tokenizer_path)")
    return cfg, hf
  values = dict(m.decoder)
  values.update(numerics)
  values["head_dim"] = values.get("head_dim") or None
  values["max_seq_len"] = values.get("max_seq_len") or seq_len or 2048
  configured = int(values.get("vocab_size") or 0)
  if not configured:
    values["vocab_size"] = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  elif configured < vocab_size:
    raise ValueError(f"model.decoder.vocab_size={configured} is smaller than the tokenizer's {vocab_size} tokens; "
                     "set it to 0 to follow the tokenizer")
  return DecoderConfig.from_config(values), None


def load_policy(config: ml_collections.ConfigDict, workdir: str, rules=None, examples: list | None = None
                ) -> PolicySource:
  """The starting policy of a run (see the module docstring)."""
  from mlx_med.llm import checkpoint as ckpt
  from mlx_med.llm import hf_config as hf_lib

  def texts():
    nonlocal examples
    if examples is None:
      train, held = load_examples(config, workdir)
      examples = train + held
    return tokenizer_corpus(examples)

  tokenizer, tokenizer_dir = resolve_tokenizer(config, workdir, texts)
  cfg, hf = decoder_config(config, len(tokenizer))
  if config.model.get("path", ""):
    params = ckpt.load_hf_params(str(config.model.path), cfg, rules)
  else:
    params = params_lib.init_params(cfg, jax.random.key(int(config.seed)), rules)
    eos = tokenizer.eos_token_ids
    hf = hf_lib.hf_config_from_decoder(cfg, base={"eos_token_id": eos[0] if len(eos) == 1 else list(eos),
                                                  "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None})
  return PolicySource(cfg, params, tokenizer, tokenizer_dir, hf)
