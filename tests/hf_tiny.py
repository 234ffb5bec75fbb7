"""Helpers for LLM tests: tiny random Hugging Face checkpoints and a tiny chat tokenizer.

Nothing is downloaded: models come from transformers configs with random weights
(every parameter redrawn, so biases and norm scales are not trivially 0 or 1) and the
tokenizer is a byte-level BPE trained here on a few sentences.
"""

from __future__ import annotations

import json
import os

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Like Qwen3, the reasoning tags are added tokens that are *not* special: they stay in decoded text.
THINK_TOKENS = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The patient has a fever and a dry cough since Monday.",
    "Diagnosis: community acquired pneumonia. Treatment: oral antibiotics for five days.",
    "Blood pressure 120/80, heart rate 72, oxygen saturation 97 percent.",
    "hello world, how are you today? I am fine, thank you.",
    "Question: what is the most likely diagnosis? Answer: asthma.",
]


def write_tokenizer(directory: str, model_max_length: int = 256) -> int:
  """Writes tokenizer.json + tokenizer_config.json (with a ChatML template); returns the vocab size."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS * 20, trainer)
  tok.add_tokens(THINK_TOKENS)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
               "model_max_length": model_max_length}, f)
  return tok.get_vocab_size()


def make_hf_model(kind: str, vocab_size: int = 320, seed: int = 0, **overrides):
  """A tiny random transformers model of one family, all weights redrawn with std 0.1."""
  import torch
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' model classes import torchvision (CUDA-linked on PyPI)
  import transformers

  common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
  common.update(overrides)
  if kind == "qwen2":
    cfg = transformers.Qwen2Config(**common)
    model_cls = transformers.Qwen2ForCausalLM
  elif kind == "qwen3":
    common.setdefault("head_dim", 32)
    cfg = transformers.Qwen3Config(**common)
    model_cls = transformers.Qwen3ForCausalLM
  elif kind == "llama":
    cfg = transformers.LlamaConfig(**common)
    model_cls = transformers.LlamaForCausalLM
  else:
    raise ValueError(kind)
  torch.manual_seed(seed)
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
    if cfg.tie_word_embeddings:
      model.tie_weights()
  return model


# name -> (family, overrides); the parity matrix of the issue.
PARITY_MODELS = {
    "qwen2_bias": ("qwen2", {}),
    "qwen3_headdim": ("qwen3", {"tie_word_embeddings": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_untied_1kv": ("llama", {"num_key_value_heads": 1}),
    "llama3_rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                              "rope_theta": 500000.0}),
}


def save_model_dir(model, directory: str, tokenizer_dir: str | None = None) -> str:
  import shutil

  model.save_pretrained(directory)
  if tokenizer_dir:
    for name in os.listdir(tokenizer_dir):
      shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
  return directory
