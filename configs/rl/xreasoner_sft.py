"""X-Reasoner stage 1: SFT on distilled long chains of thought (assistant-only loss, packed rows).

  mlx-med rl train --config configs/rl/xreasoner_sft.py:smoke --workdir runs/xr_sft_smoke
  mlx-med rl train --config configs/rl/xreasoner_sft.py --workdir runs/xr_sft \
      --config.model.path=/models/Qwen2.5-VL-7B-Instruct-text --config.data.format=jsonl \
      --config.data.path=distilled_cot.jsonl

Data: `data.format=jsonl` reads one conversation per line ({"messages": [{"role", "content"}, ...]},
or TRL's {"prompt": [...], "completion": [...]}); the loss counts the assistant turns only.
`synthetic` uses the synthetic MCQA questions with their reference chains of thought.
The fine-tuned policy is exported to <workdir>/hf, the starting point of xreasoner_grpo.py.

Variants:
  paper  the paper's stage 1: 4 epochs, lr 1e-5 (cosine, warmup 3%), context 4096, batch 128
         sequences, bf16 compute with rematerialisation, FSDP mesh.
  smoke  a tiny fresh decoder on the synthetic questions, a few steps on CPU.
  demo   the SFT stage of `make rl-demo` (tiny decoder, synthetic questions, a few minutes on CPU).
"""

import ml_collections

from configs.rl import _common as common
from mlx_med.rl import sft

VARIANTS = ("paper", "smoke", "demo")


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  config = sft.default_config()
  if variant == "paper":
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    config.data.seq_len = 4096
    config.train.update({"epochs": 4.0, "lr": 1e-5, "batch_size": 128, "schedule": "cosine", "warmup_steps": 50,
                         "weight_decay": 0.0, "log_every": 10, "eval_every": 200, "ckpt_every": 500})
    config.mesh.shape.update({"data": 1, "fsdp": -1})
    return config
  config.model.decoder = ml_collections.ConfigDict(dict(common.TINY_DECODER, head_dim=0, max_seq_len=0,
                                                        rope_theta=10000.0, norm_eps=1e-6, qk_norm=False))
  config.data.seq_len = 256
  config.data.template = "xreasoner"
  if variant == "smoke":
    config.data.synthetic.update({"n_train": 128, "n_eval": 16})
    config.train.update({"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 4,
                         "ckpt_every": 4, "async_checkpointing": False})
  else:
    config.data.synthetic.update(common.DEMO_SYNTHETIC, **common.DEMO_TEACHER)
    config.train.update({"steps": 400, "batch_size": 16, "lr": 2e-3, "schedule": "cosine", "warmup_steps": 20,
                         "weight_decay": 0.0, "log_every": 25, "eval_every": 100, "ckpt_every": 100,
                         "async_checkpointing": False})
  return config
