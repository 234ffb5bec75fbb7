"""Real LLMs in mlx_med: Hugging Face checkpoints, tokenizers, serving and clients.

  LocalLM.from_pretrained(dir)          load config.json + safetensors (+ mesh sharding) + tokenizer
  decoder_config_from_hf(config_dict)   HF config -> DecoderConfig (unsupported fields are errors)
  load_hf_params / save_hf_checkpoint   HF directory <-> (sharded) parameter tree
  hf_to_orbax / orbax_to_hf             conversion for training checkpoints
  ChatTokenizer                         tokenizer + chat template, local files only
  make_client / LocalClient / OpenAIClient   one completion interface, two backends
  python -m mlx_med.llm.serve --model DIR    OpenAI-compatible server (`mlx-med serve`)

Heavy modules (transformers, FastAPI) are imported lazily so `import mlx_med.llm` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LocalLM": "mlx_med.llm.model",
    "Generation": "mlx_med.llm.model",
    "decoder_config_from_hf": "mlx_med.llm.hf_config",
    "hf_config_from_decoder": "mlx_med.llm.hf_config",
    "read_hf_config": "mlx_med.llm.hf_config",
    "UnsupportedConfigError": "mlx_med.llm.hf_config",
    "load_hf_params": "mlx_med.llm.checkpoint",
    "save_hf_checkpoint": "mlx_med.llm.checkpoint",
    "hf_to_orbax": "mlx_med.llm.checkpoint",
    "orbax_to_hf": "mlx_med.llm.checkpoint",
    "save_orbax": "mlx_med.llm.checkpoint",
    "load_orbax": "mlx_med.llm.checkpoint",
    "CheckpointError": "mlx_med.llm.safetensors_io",
    "ChatTokenizer": "mlx_med.llm.tokenizer",
    "make_client": "mlx_med.llm.client",
    "LLMClient": "mlx_med.llm.client",
    "LocalClient": "mlx_med.llm.client",
    "OpenAIClient": "mlx_med.llm.client",
    "Completion": "mlx_med.llm.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'mlx_med.llm' has no attribute {name!r}")
