"""Sections shared by the RL configs (medrlvr.py, xreasoner_grpo.py, xreasoner_sft.py).

`model`, `data`, `rl` and `eval` are read by `mlx_med.rl` (setup, learner, sft); `train`
and `mesh` by the shared trainer (`train.batch_size` is the rows of one policy-update
minibatch; `train.steps` is unused by RL, whose length is `rl.iterations`).
"""

import ml_collections

from mlx_med.core.config import default_mesh_config, default_train_config

# A decoder small enough to train on two CPU cores (the smoke variants and `make rl-demo`).
TINY_DECODER = {"vocab_size": 0, "num_layers": 4, "d_model": 128, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 384,
                "max_seq_len": 512, "qkv_bias": True, "tie_embeddings": True, "init_std": 0.02}


# The synthetic questions of `make rl-demo` (SFT and GRPO stages share them): a knowledge base of
# 12 diseases, 2000 training and 200 held-out questions.
DEMO_SYNTHETIC = {"seed": 0, "num_diseases": 12, "n_train": 2000, "n_eval": 200}
# The demo's SFT demonstrations: from an imperfect teacher (half of its facts wrong, used for 70%
# of the demonstrations; `mlx_med.rl.sft._imperfect_teacher`), answering with the option's text (a
# 1M-parameter decoder learns facts in minutes but binds an answer to its option letter only at
# chance after 300 steps; measured, see docs/DESIGN.md).
DEMO_TEACHER = {"answer_style": "text", "teacher_error_fraction": 0.5, "teacher_error_rate": 0.7}


def model_section(path: str = "", decoder: dict | None = None, **kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "path": path,  # a Hugging Face model directory; empty: a fresh `decoder` + tokenizer
      # DecoderConfig fields (the vocabulary size comes from the tokenizer)
      "decoder": ml_collections.ConfigDict(dict(decoder or TINY_DECODER)),
      "tokenizer_path": "",  # a directory with tokenizer.json (fresh decoders); empty: train one on the questions
      "tokenizer_vocab_size": 1024,
      "dtype": kw.get("dtype", "float32"),  # compute dtype (bfloat16 on accelerators)
      "param_dtype": "float32",
      "remat": kw.get("remat", "none"),
      "attention_backend": kw.get("attention_backend", "auto"),  # auto: the blocked cpu kernel on CPU, xla elsewhere
      "max_seq_len": kw.get("max_seq_len", 0),  # 0 = the checkpoint's context
  })


def data_section(fmt: str = "synthetic", template: str = "medrlvr", **synthetic) -> ml_collections.ConfigDict:
  syn = {"seed": 0, "num_diseases": 24, "n_train": 2000, "n_eval": 200, "num_options": 4, "two_hop_fraction": 0.3,
         "answer_style": "letter"}
  syn.update(synthetic)
  return ml_collections.ConfigDict({
      "format": fmt,  # synthetic | medqa | medmcqa | mmlu_pro
      "path": "",  # the training file of a real format
      "eval_path": "",  # held-out file; empty: the last eval_fraction of a seeded shuffle of `path`
      "eval_format": "",  # empty: same as format
      "eval_fraction": 0.1,
      "health_only": True,  # MMLU-Pro: only the "health" category
      "template": template,  # prompt template: medrlvr | xreasoner | plain
      "synthetic": ml_collections.ConfigDict(syn),
  })


def rl_section(**overrides) -> ml_collections.ConfigDict:
  rl = {
      "algorithm": "grpo",  # grpo | ppo
      "iterations": 100,
      "prompts_per_iteration": 16,
      "num_generations": 8,  # G samples per prompt
      "max_prompt_len": 512,  # longer prompts are skipped (counted in the log)
      "max_new_tokens": 512,
      "temperature": 1.0,
      "top_p": 1.0,
      "ignore_eos": False,  # True: completions never stop early (throughput benchmarks)
      "think_budget": -1,  # >= 0: force "</think>" after that many tokens during rollouts (forced exit)
      "mask_forced": True,  # leave forced tokens out of the loss (the policy did not sample them)
      "rewards": "medrlvr",  # name[:weight], comma-separated (mlx_med.rl.functions rewards)
      "advantage": "grpo",  # grpo | drgrpo | rloo
      "policy_loss": "ppo_clip",
      "eps_low": 0.2,
      "eps_high": 0.2,  # > eps_low: DAPO's clip-higher
      "dual_clip": 0.0,  # > 1: dual-clip bound for negative advantages (0 = off)
      "loss_agg": "token-mean",  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
      "beta": 0.0,  # KL coefficient to the reference (0 = no reference forward)
      "kl_estimator": "k3",  # k1 | k2 | k3
      "drop_zero_variance": False,  # DAPO: groups whose rewards are all equal carry no signal
      "num_iterations": 1,  # passes (mu) over each rollout
      "logprob_batch_size": 0,  # rows per reference / behaviour forward (0 = train.batch_size)
      "ckpt_every": 10,  # iterations
      # PPO (rl.algorithm = ppo): value head beside the decoder, GAE, KL penalty in the reward
      "gamma": 1.0,
      "lam": 0.95,
      "vf_coef": 0.5,
      "value_clip": 0.2,
      "whiten_advantages": True,
      "entropy_coef": 0.0,
      "value_stop_gradient": False,
  }
  rl.update(overrides)
  return ml_collections.ConfigDict(rl)


def eval_section(**overrides) -> ml_collections.ConfigDict:
  ev = {"every": 10, "max_examples": 0, "max_new_tokens": 0, "think_budget": -1, "batch_size": 64}
  ev.update(overrides)
  return ml_collections.ConfigDict(ev)


def base_config(task: str, **train_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.peak_flops_per_device = 0.0
  config.train = default_train_config()
  config.train.update({"schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "log_every": 1,
                       "eval_every": 0, "ckpt_every": 10**9, "keep_checkpoints": 2, "async_checkpointing": False,
                       "b1": 0.9, "b2": 0.99})
  config.train.update(train_overrides)
  config.mesh = default_mesh_config()
  return config
