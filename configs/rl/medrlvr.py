"""Med-RLVR: RL from a base model on medical MCQA with a format + answer reward (PPO, as the paper; GRPO too).

  mlx-med rl train --config configs/rl/medrlvr.py:smoke --workdir runs/medrlvr_smoke
  mlx-med rl train --config configs/rl/medrlvr.py:paper --workdir runs/medrlvr \
      --config.model.path=/models/Qwen2.5-3B --config.data.format=medqa --config.data.path=medqa_train.jsonl \
      --config.data.eval_path=medqa_test.jsonl

Reward (`medrlvr`): -1 when the response breaks the `<think>...</think><answer>...</answer>` format,
else 1 for the correct option and 0 for a wrong one. The answer-leak rate (the choice stated inside
`<think>`) is logged, not rewarded, so the reward-hacking stage of the paper can be watched.

Variants:
  paper       PPO (OpenRLHF-style): value head beside the policy, GAE (gamma 1, lambda 0.95), KL penalty
              (k1, beta 0.001) in the per-token reward, whitened advantages, clip 0.2, lr 5e-7 for the
              policy, 8 samples per prompt... on a Qwen2.5-3B base model (model.path).
  paper_grpo  the same data and reward with GRPO (G = 8, beta 0.001, token-mean).
  smoke       PPO on a tiny fresh decoder and the synthetic MCQA set (CPU, a few iterations).
  smoke_grpo  GRPO likewise.
"""

from configs.rl import _common as common

VARIANTS = ("paper", "paper_grpo", "smoke", "smoke_grpo")


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  smoke = variant.startswith("smoke")
  ppo = variant in ("paper", "smoke")
  config = common.base_config("rl", lr=1e-4 if smoke else 5e-7, batch_size=32 if smoke else 64)
  config.model = common.model_section(dtype="float32" if smoke else "bfloat16", remat="none" if smoke else "full")
  sizes = {"n_train": 256, "n_eval": 32} if smoke else {}
  config.data = common.data_section("synthetic", template="medrlvr", **sizes)
  config.rl = common.rl_section(
      algorithm="ppo" if ppo else "grpo", rewards="medrlvr", beta=0.001, kl_estimator="k1",
      advantage="grpo", loss_agg="token-mean", eps_low=0.2, eps_high=0.2, temperature=1.0,
      num_generations=4 if smoke else 8, prompts_per_iteration=8 if smoke else 128,
      max_prompt_len=256 if smoke else 1024, max_new_tokens=48 if smoke else 1024,
      num_iterations=1, iterations=3 if smoke else 300, gamma=1.0, lam=0.95, vf_coef=0.5, value_clip=0.2)
  config.eval = common.eval_section(every=3 if smoke else 20, max_examples=32 if smoke else 0)
  if not smoke:
    config.mesh.shape.update({"data": 1, "fsdp": -1})
  return config
