"""config.json -> DecoderConfig: both transformers dialects, and loud refusals."""

import pytest

from mlx_med.llm.hf_config import UnsupportedConfigError, decoder_config_from_hf, hf_config_from_decoder

# The fields of a released Qwen2.5-3B-Instruct config.json that matter here (transformers 4.x dialect).
QWEN25_3B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 11008, "max_position_embeddings": 32768, "max_window_layers": 70,
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
}

LLAMA31_8B_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def llama(**overrides):
  base = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": LLAMA31_8B_ROPE, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
  base.update(overrides)
  return base


def test_qwen25_config():
  cfg = decoder_config_from_hf(QWEN25_3B, dtype="bfloat16")
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim) == (36, 2048, 16, 2, 11008)
  assert cfg.qkv_bias and not cfg.qk_norm and cfg.tie_embeddings
  assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.resolved_head_dim == 128
  assert cfg.dtype == "bfloat16" and cfg.max_seq_len == 32768


def test_llama31_rope_scaling_in_both_dialects():
  v4 = decoder_config_from_hf(llama())
  v5_config = llama(rope_parameters={**LLAMA31_8B_ROPE, "rope_theta": 500000.0})
  del v5_config["rope_scaling"], v5_config["rope_theta"]
  v5 = decoder_config_from_hf(v5_config)
  assert v4 == v5
  assert v4.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  assert not v4.qkv_bias and not v4.tie_embeddings


def test_qwen3_head_dim_and_qk_norm():
  cfg = decoder_config_from_hf({"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
                                "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                                "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000,
                                "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
                                "sliding_window": None, "max_window_layers": 28})
  assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 128 and cfg.resolved_head_dim == 128


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"use_sliding_window": True, "max_window_layers": 0}, "use_sliding_window"),
    ({"layer_types": ["full_attention"] * 35 + ["sliding_attention"]}, "layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "mrope", "mrope_section": [16, 24, 24]}}, "rope_type"),
])
def test_unsupported_qwen_fields_are_errors(change, field):
  with pytest.raises(UnsupportedConfigError, match=field):
    decoder_config_from_hf({**QWEN25_3B, **change})


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_unsupported_llama_fields_are_errors(change, field):
  with pytest.raises(UnsupportedConfigError, match=field):
    decoder_config_from_hf(llama(**change))


def test_qwen3_attention_bias_is_an_error():
  with pytest.raises(UnsupportedConfigError, match="attention_bias"):
    decoder_config_from_hf({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "attention_bias": True})


def test_sliding_window_switched_off_is_accepted():
  # Qwen2.5 ships sliding_window set but disabled; and a window on no layer is no window.
  decoder_config_from_hf({**QWEN25_3B, "use_sliding_window": True, "max_window_layers": 36})


@pytest.mark.parametrize("config", [QWEN25_3B, llama(), llama(tie_word_embeddings=True, rope_scaling=None)])
def test_round_trip(config):
  cfg = decoder_config_from_hf(config)
  assert decoder_config_from_hf(hf_config_from_decoder(cfg, base=config)) == cfg
  assert decoder_config_from_hf(hf_config_from_decoder(cfg)) == cfg
