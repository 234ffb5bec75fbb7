"""A small chat tokenizer trained from text, for models built from scratch (the synthetic task, tests).

`train_chat_tokenizer` fits a byte-level BPE (the `tokenizers` library) and writes a
directory that both `transformers.AutoTokenizer` (local files only) and
`mlx_med.llm.ChatTokenizer.from_dir` load, laid out like Qwen's:

* special tokens `<|endoftext|>` (padding, id 0), `<|im_start|>` (1), `<|im_end|>` (2, end
  of turn and end of sequence);
* the reasoning tags `<think>`, `</think>`, `<answer>`, `</answer>` as added tokens that are
  *not* special: each is one id, so rewards and the think-budget hook can find them, yet
  they stay in decoded text (skipping special tokens must not erase the reasoning format);
* a ChatML chat template (system / user / assistant turns, `add_generation_prompt`).

Byte-level BPE is lossless: `decode(encode(x)) == x` for any text without special tokens.
The directory is written under a temporary name and renamed, so a crash never leaves a
half-written tokenizer behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from mlx_med.core.fileio import write_text_dir
from mlx_med.llm.tokenizer import ChatTokenizer

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# ChatML as Qwen2.5 renders it, without the default system prompt; unknown roles are refused.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown chat role ' + message['role'] + '; use system, user, assistant or tool') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _write_dir(out_dir: str, files: dict[str, str]) -> None:
  """Writes `files` (name -> text) as the directory `out_dir`, atomically (temp dir, rename)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir):
    foreign = sorted(set(os.listdir(out_dir)) - set(TOKENIZER_FILES) - {"special_tokens_map.json"})
    if foreign:
      raise FileExistsError(f"{out_dir} exists and holds other files ({', '.join(foreign[:4])}); "
                            "choose an empty or new directory for the tokenizer")
  elif os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} is a file; choose a directory path for the tokenizer")
  write_text_dir(out_dir, files)


def train_chat_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int = 1024,
                         model_max_length: int = 32768) -> ChatTokenizer:
  """Fits a byte-level BPE of at most `vocab_size` ids (special and reasoning tokens included)
  on `texts`, writes it to `out_dir` (tokenizer.json, tokenizer_config.json,
  generation_config.json) and returns it loaded with `ChatTokenizer.from_dir`."""
  from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
  )

  base = 256 + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
  if vocab_size < base:
    raise ValueError(f"vocab_size={vocab_size} is below the {base} ids that the 256 bytes, the special and the "
                     "reasoning tokens need; choose a larger vocab_size")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(REASONING_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator((t for t in texts if t), trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": IM_END,
      "pad_token": PAD_TOKEN,
      "unk_token": None,
      "add_bos_token": False,
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(model_max_length),
      "chat_template": CHAT_TEMPLATE,
  }
  generation = {"eos_token_id": ids[IM_END], "pad_token_id": ids[PAD_TOKEN], "bos_token_id": None}
  _write_dir(out_dir, {
      "tokenizer.json": tok.to_str(),
      "tokenizer_config.json": json.dumps(config, indent=2),
      "generation_config.json": json.dumps(generation, indent=2),
  })
  return ChatTokenizer.from_dir(out_dir)
