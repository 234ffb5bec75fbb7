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
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mlx_med.core import params as params_lib
from mlx_med.core.transformer import DecoderConfig


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


def load_policy(config: ml_collections.ConfigDict, workdir: str, rules=None, examples: list | None = None
                ) -> PolicySource:
  """The starting policy of a run (see the module docstring)."""
  from mlx_med.llm import checkpoint as ckpt
  from mlx_med.llm import hf_config as hf_lib
  from mlx_med.llm.tokenizer import ChatTokenizer

  m = config.model
  path = str(m.get("path", ""))
  if path:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"model.path={path!r} is not a directory; give a Hugging Face model directory")
    hf = hf_lib.read_hf_config(path)
    cfg = hf_lib.decoder_config_from_hf(hf, dtype=str(m.get("dtype", "float32")),
                                        param_dtype=str(m.get("param_dtype", "float32")),
                                        max_seq_len=int(m.get("max_seq_len", 0)) or None,
                                        attention_backend=str(m.get("attention_backend", "xla")), scan_layers=True)
    cfg = dataclasses.replace(cfg, remat=str(m.get("remat", "none")))
    params = ckpt.load_hf_params(path, cfg, rules)
    return PolicySource(cfg, params, ChatTokenizer.from_dir(path), path, hf)

  tok_dir = str(m.get("tokenizer_path", ""))
  if not tok_dir:
    from mlx_med.rl import tokenizer as tok_lib

    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
      if examples is None:
        train, held = load_examples(config, workdir)
        examples = train + held
      tok_lib.train_chat_tokenizer(tokenizer_corpus(examples), tok_dir,
                                   vocab_size=int(m.get("tokenizer_vocab_size", 1024)))
  tokenizer = ChatTokenizer.from_dir(tok_dir)
  fields = dict(m.decoder)
  vocab = len(tokenizer)
  fields["vocab_size"] = -(-vocab // 64) * 64  # room for every id, rounded for even sharding
  cfg = DecoderConfig.from_config(fields)
  params = params_lib.init_params(cfg, jax.random.key(int(config.seed)), rules)
  eos = tokenizer.eos_token_ids
  hf = hf_lib.hf_config_from_decoder(cfg, base={"eos_token_id": eos[0] if eos else None,
                                                "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None})
  return PolicySource(cfg, params, tokenizer, tok_dir, hf)
