"""Exact FLOP counts of the decoder, and model-FLOPs utilisation (MFU).

We count multiply-adds as 2 FLOPs, every matmul of the forward pass including
attention scores and the attention-weighted sum (causal: a token at position i
attends to i+1 keys, so the average context is (T+1)/2), and the LM head.
Training = forward + backward = 3x forward. Norms, RoPE and softmax are not
matmuls and are left out, as in the usual MFU convention.
"""

from __future__ import annotations

import jax

from mlx_med.core.transformer import DecoderConfig

# Dense peak FLOP/s per chip for the compute dtype (vendor figures, no sparsity).
PEAK_FLOPS = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H100", "bfloat16"): 989e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312e12,
    ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12,
    ("NVIDIA H100", "float32"): 67e12,
}


def forward_flops_per_token(cfg: DecoderConfig, seq_len: int, causal: bool = True) -> float:
  d, hd, h, k = cfg.d_model, cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
  projections = 2 * d * hd * (h + 2 * k) + 2 * h * hd * d
  mlp = 3 * 2 * d * cfg.mlp_dim
  context = (seq_len + 1) / 2 if causal else seq_len
  attention = 2 * 2 * h * hd * context
  head = 2 * d * cfg.vocab_size
  return cfg.num_layers * (projections + mlp + attention) + head


def train_flops_per_token(cfg: DecoderConfig, seq_len: int, causal: bool = True) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len, causal)


def device_peak_flops(dtype: str, device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device for `dtype`, or None when not known (e.g. CPU)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  if (kind, dtype) in PEAK_FLOPS:
    return PEAK_FLOPS[(kind, dtype)]
  for (name, dt), value in PEAK_FLOPS.items():
    if dt == dtype and kind.startswith(name):
      return value
  return None


def mfu(tokens_per_second: float, cfg: DecoderConfig, seq_len: int, num_devices: int,
        peak_per_device: float | None) -> float | None:
  if not peak_per_device:
    return None
  return tokens_per_second * train_flops_per_token(cfg, seq_len) / (peak_per_device * num_devices)
