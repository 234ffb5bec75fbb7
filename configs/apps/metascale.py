"""METASCALE: meta-thought pool + UCB1 + genetic evolution, against plain sampling and best-of-N at equal budget.

  python -c "from configs.apps.metascale import get_config; from mlx_med.apps.metascale import run_experiment; \
print(run_experiment(get_config('smoke'), 'runs/metascale_smoke'))"

Sections:
  client        mlx_med.llm.client.make_client's section: the policy model (local dir, mlx-med serve, vLLM, Azure).
  judge_client  the same for the judge (scorer and pairwise judge); backend "" = the policy client itself.
  metascale     mlx_med.apps.metascale.MetaScaleConfig fields (pool, UCB1 constant, evolution, budget).
  eval          prompts (synthetic | a JSONL path with "prompt" and optional "key_points"), how many,
                the scorer (llm_judge | keyword), the sampling budgets of the win-rate-vs-budget curve.

Variants:
  paper  a strong chat model behind an OpenAI-compatible endpoint (MLX_MED_LLM_BASE_URL / _MODEL), an LLM judge,
         a pool of 4 self-composed + 4 instruction-derived meta-thoughts, UCB1 with c = sqrt(2), evolution every
         4 samples, budgets of 4 to 32 samples per prompt. Point eval.prompts at an Arena-Hard-style JSONL.
  smoke  the same pipeline for `make apps-demo` on 2 CPU cores: a served small model, the keyword scorer over the
         synthetic prompts' key points (a known optimum; no judge calls during search), 4 prompts, budgets 2 and 4.
"""

import math

import ml_collections

VARIANTS = ("paper", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  smoke = variant == "smoke"
  config = ml_collections.ConfigDict()
  config.client = ml_collections.ConfigDict(
      {"backend": "openai", "model": "", "base_url": "http://127.0.0.1:8000/v1", "timeout": 120.0, "max_retries": 2}
      if smoke else {"backend": "openai", "model": "", "base_url": "", "timeout": 120.0, "max_retries": 2})
  config.judge_client = ml_collections.ConfigDict({"backend": ""})  # "" = the policy client
  config.metascale = ml_collections.ConfigDict({
      "samples_per_prompt": 4 if smoke else 16,
      "max_calls": 0,
      "max_tokens_budget": 0,
      "num_self_composed": 2 if smoke else 4,
      "num_from_instructions": 2 if smoke else 4,
      "instructions_path": "",            # "" = the generated synthetic instruction set
      "num_instructions": 120,
      "instruction_strategy": "template" if smoke else "llm",
      "ucb_c": math.sqrt(2.0),            # UCB1's constant (Auer et al. 2002)
      "evolve_every": 2 if smoke else 4,
      "evolve_min_pulls": 1,
      "num_parents": 2,
      "num_crossover": 1,
      "num_mutation": 1,
      "pool_cap": 6 if smoke else 12,
      "max_tokens": 48 if smoke else 1024,
      "temperature": 0.7,
      "top_p": 1.0,
      "init_max_tokens": 64 if smoke else 200,
      "init_temperature": 1.0,
      "chars_per_token": 1.0,
      "seed": 0,
      "max_workers": 4 if smoke else 8,
  })
  config.eval = ml_collections.ConfigDict({
      "prompts": "synthetic",             # or a JSONL path: {"prompt": ..., "key_points": [...]?}
      "n_prompts": 4 if smoke else 0,     # 0 = all
      "scorer": "keyword" if smoke else "llm_judge",
      "budgets": [2, 4] if smoke else [4, 8, 16, 32],
      "n_boot": 1000,
  })
  return config
