"""Hugging Face `config.json` <-> `DecoderConfig`, refusing what the decoder cannot do.

A config field that changes the computation but that our decoder does not implement
(sliding-window attention switched on, an unknown rope type, biases on Llama's
attention output or MLP, a non-SiLU activation, partial rotary embeddings, ...) is an
`UnsupportedConfigError` naming the field: a silently ignored field would give a
model that loads fine and computes something else. Fields that do not affect the
forward pass (ids, dropout, use_cache, ...) are accepted.

Both config dialects are read: transformers 4.x (`rope_theta` + `rope_scaling`) and
5.x (`rope_parameters`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from mlx_med.core.transformer import DecoderConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(ValueError):
  """A config.json field (or value) our decoder does not implement."""


def read_hf_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{model_dir!r} has no config.json: expected a Hugging Face model directory")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _fail(field: str, value: Any, why: str) -> None:
  raise UnsupportedConfigError(f"config.json field {field}={value!r}: {why}")


def _rope_settings(hf: dict) -> tuple[float, Optional[tuple[tuple[str, Any], ...]]]:
  """(theta, DecoderConfig.rope_scaling) from either config dialect."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  if params and scaling:
    merged = {**scaling, **params}
  else:
    merged = dict(params or scaling or {})
  if any(isinstance(v, dict) for v in merged.values()):
    _fail("rope_parameters", merged, "per-layer-type rotary settings are not supported")
  theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind not in _SUPPORTED_ROPE_TYPES:
    _fail("rope_type", kind, f"unsupported rotary scaling (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})")
  partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    _fail("partial_rotary_factor", partial, "partial rotary embeddings are not supported")
  for extra in ("mrope_section", "mrope_interleaved"):
    if extra in merged:
      _fail(f"rope_parameters.{extra}", merged[extra], "multimodal rotary embeddings are not supported")
  if kind == "default":
    return theta, None
  if "factor" not in merged:
    _fail("rope_parameters", merged, f"rope_type {kind!r} needs 'factor'")
  scaling_out: dict[str, Any] = {"rope_type": kind, "factor": float(merged["factor"])}
  if kind == "llama3":
    for key in ("low_freq_factor", "high_freq_factor"):
      if key not in merged:
        _fail("rope_parameters", merged, f"llama3 rotary scaling needs {key!r}")
      scaling_out[key] = float(merged[key])
    scaling_out["original_max_position_embeddings"] = int(
        merged.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
  return theta, tuple(sorted(scaling_out.items()))


def _check_sliding_window(hf: dict) -> None:
  layer_types = hf.get("layer_types")
  if layer_types:
    odd = sorted(set(layer_types) - {"full_attention"})
    if odd:
      _fail("layer_types", odd, "only full attention is supported (sliding-window layers are enabled)")
  if hf.get("use_sliding_window"):
    num_layers = int(hf.get("num_hidden_layers", 0))
    window_layers = int(hf.get("max_window_layers", 0))
    # Qwen2/3 use the window only on layers >= max_window_layers.
    if hf.get("sliding_window") is not None and window_layers < num_layers:
      _fail("use_sliding_window", True, "sliding-window attention is not supported")


def decoder_config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: Optional[str] = None,
                           max_seq_len: Optional[int] = None, attention_backend: str = "xla",
                           remat: str = "none", scan_layers: bool = True) -> DecoderConfig:
  """Builds the `DecoderConfig` for a Llama / Qwen2 / Qwen2.5 / Qwen3 `config.json` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    _fail("model_type", model_type, f"unknown model type (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise UnsupportedConfigError(f"config.json lacks required fields {missing}")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    _fail("hidden_act", act, "only SiLU-gated MLPs are supported")
  if hf.get("mlp_bias"):
    _fail("mlp_bias", True, "MLP biases are not supported")
  _check_sliding_window(hf)
  if model_type == "llama":
    if hf.get("attention_bias"):
      _fail("attention_bias", True, "Llama attention biases (q/k/v and o_proj) are not supported")
    qkv_bias, qk_norm = False, False
  elif model_type == "qwen2":
    qkv_bias, qk_norm = True, False  # Qwen2/2.5 always carry q/k/v biases (none on o_proj)
  else:  # qwen3
    if hf.get("attention_bias"):
      _fail("attention_bias", True, "Qwen3 attention biases (including o_proj) are not supported")
    qkv_bias, qk_norm = False, True
  theta, scaling = _rope_settings(hf)
  heads = int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim")
  hidden = int(hf["hidden_size"])
  if head_dim is not None and int(head_dim) == hidden // heads and hidden % heads == 0:
    head_dim = None  # the default; keeps configs that differ only in spelling equal
  position_limit = int(hf.get("max_position_embeddings", 2048))
  return DecoderConfig(
      vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      d_model=hidden,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      mlp_dim=int(hf["intermediate_size"]),
      head_dim=int(head_dim) if head_dim is not None else None,
      max_seq_len=int(max_seq_len or position_limit),
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False is the default of all three families
      qkv_bias=qkv_bias,
      qk_norm=qk_norm,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      remat=remat,
      scan_layers=scan_layers,
      attention_backend=attention_backend,
      init_std=float(hf.get("initializer_range", 0.02)),
  )


def model_type_for(cfg: DecoderConfig) -> str:
  """The HF family whose modeling code computes exactly what `cfg` computes."""
  if cfg.qk_norm:
    if cfg.qkv_bias:
      raise UnsupportedConfigError("no Hugging Face family has q/k norm together with q/k/v bias only")
    return "qwen3"
  if cfg.qkv_bias:
    return "qwen2"
  return "llama"


def hf_config_from_decoder(cfg: DecoderConfig, *, model_type: Optional[str] = None, base: Optional[dict] = None,
                           torch_dtype: str = "float32") -> dict:
  """A `config.json` dict for `cfg`, keeping unrelated fields of `base` (e.g. token ids).

  Written in the transformers-4 dialect (`rope_theta`, `rope_scaling`), which both
  transformers 4.x and 5.x read.
  """
  model_type = model_type or (base or {}).get("model_type") or model_type_for(cfg)
  expected = model_type_for(cfg)
  if model_type != expected:
    raise UnsupportedConfigError(f"model_type {model_type!r} cannot express this decoder (it needs {expected!r})")
  out = dict(base or {})
  for stale in ("rope_parameters", "transformers_version", "_name_or_path", "dtype", "layer_types"):
    out.pop(stale, None)
  scaling = cfg.rope_scaling_dict
  out.update({
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len if not base else base.get("max_position_embeddings", cfg.max_seq_len),
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": torch_dtype,
      "initializer_range": cfg.init_std,
  })
  if model_type in ("llama", "qwen3"):
    out["attention_bias"] = False
  if model_type == "llama":
    out["mlp_bias"] = False
  if model_type in ("qwen2", "qwen3"):
    out.setdefault("use_sliding_window", False)
  return out
