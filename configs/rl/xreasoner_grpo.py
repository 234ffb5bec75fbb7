"""X-Reasoner stage 2: GRPO with a 0/1 answer reward, token-level loss and clip-higher.

  mlx-med rl train --config configs/rl/xreasoner_grpo.py:smoke --workdir runs/xr_grpo_smoke
  mlx-med rl train --config configs/rl/xreasoner_grpo.py --workdir runs/xr_grpo \
      --config.model.path=/models/xreasoner-sft --config.data.format=medqa --config.data.path=medqa_train.jsonl

Variants:
  paper  the paper's hyperparameters: G = 8, 128 prompts per iteration, temperature 1.0, max length
         4096, lr 3e-6, beta 0.01 (k3 KL to the SFT model), clip 0.2 with clip-higher (eps_high 0.28),
         token-level loss aggregation; bf16 compute, FSDP mesh. Start from the stage-1 SFT policy
         (model.path) -- the paper used Qwen2.5-VL-7B-Instruct after long-CoT SFT.
  smoke  a tiny fresh decoder on the synthetic MCQA set, a few iterations on CPU.
  demo   the GRPO stage of `make rl-demo`: from the demo's SFT policy (model.path, set by
         mlx_med.rl.demo) on the same synthetic questions; beta 0 (no reference forward: the
         run is short and the policy stays near its start), G = 8, 16 prompts per iteration, and
         Med-RLVR's reward (-1 for a broken format): with the 0/1 answer reward alone a
         1M-parameter policy at lr 5e-4 lost its format within 10 iterations (measured).
"""

from configs.rl import _common as common

VARIANTS = ("paper", "smoke", "demo")


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  if variant == "demo":
    return _demo()
  smoke = variant == "smoke"
  config = common.base_config("rl", lr=1e-4 if smoke else 3e-6, batch_size=32 if smoke else 128)
  config.model = common.model_section(dtype="float32" if smoke else "bfloat16", remat="none" if smoke else "full")
  config.data = common.data_section("synthetic", template="xreasoner",
                                    **({"n_train": 256, "n_eval": 32} if smoke else {}))
  config.rl = common.rl_section(
      algorithm="grpo", rewards="xreasoner", advantage="grpo", loss_agg="token-mean", beta=0.01,
      kl_estimator="k3", eps_low=0.2, eps_high=0.28, temperature=1.0,
      num_generations=4 if smoke else 8, prompts_per_iteration=8 if smoke else 128,
      max_prompt_len=256 if smoke else 1024, max_new_tokens=48 if smoke else 4096,
      iterations=3 if smoke else 500)
  config.eval = common.eval_section(every=3 if smoke else 20, max_examples=32 if smoke else 0)
  if not smoke:
    config.mesh.shape.update({"data": 1, "fsdp": -1})
  return config


def _demo():
  config = common.base_config("rl", lr=2e-4, batch_size=128)
  config.model = common.model_section()
  config.data = common.data_section("synthetic", template="xreasoner", **common.DEMO_SYNTHETIC)
  config.rl = common.rl_section(
      algorithm="grpo", rewards="medrlvr", advantage="grpo", loss_agg="token-mean", beta=0.0,
      eps_low=0.2, eps_high=0.28, temperature=1.0, num_generations=8, prompts_per_iteration=16,
      max_prompt_len=256, max_new_tokens=40, iterations=150, ckpt_every=10)
  config.eval = common.eval_section(every=10, max_examples=0, batch_size=200)
  return config
