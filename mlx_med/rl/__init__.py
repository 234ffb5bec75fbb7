"""Reinforcement learning with verifiable rewards (Med-RLVR, X-Reasoner), in pure JAX.

  functions   registered pure functions: rewards, advantage estimators, policy losses,
              loss aggregations, KL estimators (chosen by name from the config)
  data/synth  MedQA / MedMCQA / MMLU-Pro loaders and prompt templates; a synthetic
              verifiable medical MCQA generator over a random knowledge base
  sft         long chain-of-thought SFT on the shared trainer (assistant-only loss, packing)
  ppo         value head beside the shared decoder, GAE, the PPO update task
  learner     the GRPO / PPO loop: rollout -> rewards -> advantages -> minibatch updates
  evaluate    MCQA accuracy, format-failure and answer-leak rates; training-dynamics plots

Modules are imported on use (`from mlx_med.rl import functions`), so this package stays cheap to import.
"""
