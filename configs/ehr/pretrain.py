"""EHR foundation-model pretraining: Llama-style decoder on ETHOS-style MEDS timelines.

Smoke run on CPU (a synthetic cohort is generated into the workdir, ~2 minutes):
  mlx-med train --config configs/ehr/pretrain.py:smoke --workdir runs/ehr_smoke

Your own MEDS root (e.g. MIMIC-IV converted by the MIMIC-IV MEDS ETL):
  mlx-med train --config configs/ehr/pretrain.py:base --workdir runs/ehr_base \
      --config.data.meds_root=/data/mimiciv_meds

Variants: smoke (CPU minutes), small (~10M params), base (~100M params, accelerators).
Sizes of the scaling-law study are set by overriding model.* and train.steps.
"""

import ml_collections

from mlx_med.core.config import default_mesh_config, default_train_config

_MODELS = {
    #        layers d_model heads kv  mlp
    "smoke": (2, 64, 4, 2, 192),
    "small": (6, 256, 8, 4, 768),
    "base": (12, 768, 12, 4, 2048),
}


def get_config(arg=None):
  variant = arg or "base"
  if variant not in _MODELS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_MODELS)}")
  layers, d_model, heads, kv_heads, mlp = _MODELS[variant]
  smoke = variant == "smoke"

  config = ml_collections.ConfigDict()
  config.task = "ehr_pretrain"
  config.seed = 0
  config.peak_flops_per_device = 0.0  # 0 = look up the device; set for unknown hardware

  config.data = ml_collections.ConfigDict(dict(
      meds_root="",  # empty: generate a synthetic cohort into <workdir>/synthetic_meds
      synth_subjects=2000 if smoke else 20000,
      synth_seed=0,
      vocab_path="",  # empty: fit on the train split and save <workdir>/vocab.json
      cache_dir="",  # empty: <workdir>/token_cache
      seq_len=128 if smoke else 2048,
      packing="window",  # window: one patient per row, padded | packed: segment ids
      min_code_count=5,
      num_value_bins=10,
      hierarchical_codes=True,
      train_split="train",
      eval_split="tuning",
      worker_count=0,
  ))

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary, rounded up to a multiple of 64
      num_layers=layers,
      d_model=d_model,
      num_heads=heads,
      num_kv_heads=kv_heads,
      mlp_dim=mlp,
      head_dim=0,  # 0: d_model // num_heads
      rope_theta=10000.0,
      norm_eps=1e-5,
      tie_embeddings=False,
      dtype="float32" if smoke else "bfloat16",
      param_dtype="float32",
      remat="none" if smoke else "dots",
      attention_backend="xla",
  ))

  config.train = default_train_config()
  if smoke:
    config.train.update(dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=10, log_every=5,
                             eval_every=30, eval_batches=4, ckpt_every=30, weight_decay=0.0))
  else:
    config.train.update(dict(steps=20000, batch_size=64, lr=6e-4, warmup_steps=500, eval_every=1000,
                             ckpt_every=1000))
  config.mesh = default_mesh_config()
  return config
