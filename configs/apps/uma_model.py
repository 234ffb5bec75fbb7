"""The apps' embedded default model: a small decoder fine-tuned on UMA's prompts over synthetic records.

  python -m mlx_med.apps.train --config configs/apps/uma_model.py:smoke --workdir runs/uma_model --eval
  mlx-med serve --model runs/uma_model/sft/hf

What it is for: showing the abstraction pipeline offline (mlx_med.apps.train explains the data).
It is not an LLM: it has learned this one synthetic task, and UMA's zero-shot claim needs a real
one (point the client at it instead).

Variants:
  smoke  the model `make apps-demo` serves: 400 steps of 8 packed 1024-token rows from scratch (about 7 minutes
         on 2 quiet CPU cores; 0.54 held-out per-note accuracy, where "unknown" always scores 0.23).
  tiny   a handful of steps on a tiny decoder (tests).
  base   a larger decoder and more data (about 4x the smoke run's compute).
"""

import ml_collections

from mlx_med.rl import sft

VARIANTS = ("smoke", "tiny", "base")


def get_config(arg: str | None = None):
  variant = arg or "smoke"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  config = sft.default_config()
  config.task = "apps_uma_model"
  config.uma = ml_collections.ConfigDict({
      "attributes": "",          # "" = configs/apps/oncology_attributes.json
      "n_patients": 160,         # training patients (about 7 notes each)
      "n_eval_patients": 24,     # held-out patients (another generator seed)
      "seed": 0,
      "unknown_ratio": 1.0,      # per attribute: notes that do not say, per note that does
      "min_unknown": 8,
      "evidence": "sentence",    # the reply's evidence: "sentence" (the stating sentence) or "none" ("")
      # UMA's extraction plan (uma.abstract_patients' defaults): the excerpts the model learns to read
      "chunk_words": 120, "chunk_overlap": 20, "top_k": 2, "n_recent": 3,
  })
  config.model.tokenizer_vocab_size = 2048
  config.model.decoder.update({"num_layers": 4, "d_model": 128, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 384,
                               "tie_embeddings": True})
  config.data.format = "jsonl"
  config.data.seq_len = 1024
  config.train.update({"steps": 400, "batch_size": 8, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 20,
                       "weight_decay": 0.0, "log_every": 25, "eval_every": 200, "eval_batches": 4,
                       "ckpt_every": 200, "async_checkpointing": False})
  if variant == "tiny":
    config.uma.update({"n_patients": 4, "n_eval_patients": 2, "min_unknown": 1})
    config.model.tokenizer_vocab_size = 512
    config.model.decoder.update({"num_layers": 1, "d_model": 32, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64})
    config.data.seq_len = 768  # room for a constrained reply after the longest prompt (about 450 tokens)
    config.train.update({"steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "eval_every": 3,
                         "eval_batches": 1, "ckpt_every": 3})
  elif variant == "base":
    config.uma.update({"n_patients": 400, "n_eval_patients": 48})
    config.model.decoder.update({"num_layers": 6, "d_model": 192, "num_heads": 6, "num_kv_heads": 2, "mlp_dim": 576})
    config.train.update({"steps": 1000, "lr": 2e-3})
  return config
