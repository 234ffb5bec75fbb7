"""Tokenizer and chat template of a local Hugging Face model directory.

We go through `transformers.AutoTokenizer` with `local_files_only=True`, so the
template, special tokens and normalisation are exactly what the model's authors
shipped, and nothing is fetched from the network. Chat prompts are rendered to text
by the template and then encoded *without* adding special tokens, because templates
already contain the BOS/role markers (adding them again is a classic silent bug).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Optional, Sequence


_PLAIN_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _tokenizer_class(model_dir: str) -> Optional[str]:
  path = os.path.join(model_dir, "tokenizer_config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None  # AutoTokenizer reports a broken file itself


class ChatTokenizer:
  """Encode/decode text, render chat messages, and know which ids end a turn."""

  def __init__(self, hf_tokenizer: Any, generation_config: Optional[dict] = None):
    self.hf = hf_tokenizer
    self.generation_config = dict(generation_config or {})
    # transformers may reconfigure the Rust tokenizer (truncation/padding) inside a call;
    # concurrent calls from the server's event loop and batching thread then collide
    # ("Already borrowed"), so every call goes through one lock.
    self._lock = threading.Lock()

  @classmethod
  def from_dir(cls, model_dir: str) -> "ChatTokenizer":
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
      raise FileNotFoundError(f"{model_dir!r} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    hf = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")) and _tokenizer_class(model_dir) in _PLAIN_FAST:
      # A plain fast tokenizer: load it as one. AutoTokenizer would first resolve the
      # directory's model config (config.json's model_type and, for a vision-language
      # model, its vision and text sub-configs), which imports modelling packages that
      # tokenizing does not need.
      from transformers import PreTrainedTokenizerFast

      hf = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    if hf is None:
      hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    generation = {}
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        generation = json.load(f)
    return cls(hf, generation)

  # ---- text

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    with self._lock:
      return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    with self._lock:
      return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_text(self, token_id: int) -> str:
    """The text of one token as OpenAI logprobs show it (may be a partial UTF-8 character)."""
    with self._lock:
      return self.hf.decode([int(token_id)], skip_special_tokens=False)

  def __len__(self) -> int:
    return len(self.hf)

  # ---- chat

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.hf, "chat_template", None))

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
    if not self.has_chat_template:
      raise ValueError("this model's tokenizer has no chat template; use plain completions")
    with self._lock:
      text = self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    if not isinstance(text, str):  # some versions return a list for batched input
      text = text[0]
    return text

  def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs), add_special_tokens=False)

  # ---- special ids

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """Ids that end a generation: generation_config.json's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    eos = self.generation_config.get("eos_token_id")
    if isinstance(eos, int):
      ids.append(eos)
    elif isinstance(eos, (list, tuple)):
      ids.extend(int(x) for x in eos)
    if self.hf.eos_token_id is not None:
      ids.append(int(self.hf.eos_token_id))
    return tuple(dict.fromkeys(ids))

  @property
  def pad_token_id(self) -> int:
    for candidate in (self.hf.pad_token_id, self.hf.eos_token_id):
      if candidate is not None:
        return int(candidate)
    return 0

  def token_ids_of(self, text: str) -> tuple[int, ...]:
    """Token ids of a tag such as "</think>" (used by the think-budget hook)."""
    return tuple(self.encode(text, add_special_tokens=False))
