"""IsoFLOP sweep of EHR decoders: the scaling-law study of "Exploring Scaling Laws for EHR
Foundation Models", on the synthetic cohort or your own MEDS data.

Smoke study (what `make demo` runs: 3 budgets x 5 sizes on CPU, then fits, evaluation, report;
about 15 minutes on 2 cores):
  mlx-med scaling run --config configs/ehr/isoflops.py:smoke --workdir runs/scaling_smoke

MIMIC-IV scale (1M to 1B parameters; one job per run on a GPU cluster or TPU pod):
  mlx-med scaling run --config configs/ehr/isoflops.py:mimic --workdir /shared/isoflops \
      --config.data.meds_root=/data/mimiciv/MEDS_cohort --emit-jobs jobs.txt
  # then each line of jobs.txt, e.g. with launch/slurm_gpu.sbatch; finally:
  mlx-med scaling report --workdir /shared/isoflops

Variants: smoke (CPU, about 15 minutes), mimic (MIMIC-IV-scale grid for accelerators).

Size rule (mlx_med/scaling/sweep.py): each width d_model gives depth round(d_model /
aspect_ratio) clipped to [min_layers, max_layers], d_model / head_dim heads, kv_group
query heads per KV head, and an MLP of mlp_ratio x d_model. Each (budget C, width) run
trains on D = C / F tokens, F the exact training FLOPs per token of that model.
"""

import importlib.util
import os

import ml_collections


def _pretrain_config(variant):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
  spec = importlib.util.spec_from_file_location("_mlx_med_config_pretrain_for_isoflops", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _evaluation(num_trajectories, max_examples):
  """Clinical utility of every finished run (mlx_med/ehr/evaluate.py); tasks=() turns it off.
  max_examples: label rows per task and split (a deterministic subsample; 0 = all)."""
  return ml_collections.ConfigDict(dict(tasks=("mortality", "readmission", "long_stay"),
                                        evaluators=("zero_shot", "probe", "baseline"),
                                        num_trajectories=num_trajectories, max_examples=max_examples))


def get_config(arg=None):
  variant = arg or "smoke"
  if variant not in ("smoke", "mimic"):
    raise ValueError(f"unknown variant {variant!r}; choose one of ['mimic', 'smoke']")
  smoke = variant == "smoke"
  config = _pretrain_config("smoke" if smoke else "base")
  config.task = "ehr_isoflops"

  if smoke:
    config.data.synth_subjects = 4000
    config.data.seq_len = 128
    config.data.min_code_count = 100  # a ~450-token vocabulary: the LM head would dwarf models this small
    config.model.dtype = "float32"
    config.model.remat = "none"
    config.model.attention_backend = "cpu"
    config.train.update(dict(batch_size=32, lr=3e-3, warmup_steps=20, log_every=100, eval_batches=0,
                             ckpt_every=500, weight_decay=0.0, async_checkpointing=False))
    config.sweep = ml_collections.ConfigDict(dict(
        budgets=(2e11, 4e11, 8e11),  # training FLOPs per run
        widths=(8, 12, 16, 24, 32),  # d_model; depth, heads and MLP follow the size rule
        aspect_ratio=16.0, head_dim=4, kv_group=1, mlp_ratio=8 / 3, min_layers=1, max_layers=8,
        min_steps=20,
    ))
    # Zero-shot is off at smoke size: about 13 s a run (the demo would pass 15 minutes), and weak
    # at a 128-token context (docs/DESIGN.md). Probe and baseline on 200 label rows per task and
    # split take about 9 s a run.
    config.evaluation = _evaluation(num_trajectories=8, max_examples=200)
    config.evaluation.evaluators = ("probe", "baseline")
  else:
    config.data.seq_len = 2048
    config.train.update(dict(batch_size=64, lr=1e-3, warmup_steps=500, log_every=50, eval_batches=0,
                             ckpt_every=1000))
    config.sweep = ml_collections.ConfigDict(dict(
        # MIMIC-IV: about 267M training tokens; the paper's grid spans about 1M to 1B parameters.
        budgets=(1e16, 3e16, 1e17, 3e17, 1e18, 3e18),
        widths=(128, 256, 384, 512, 768, 1024, 1536, 2048),
        aspect_ratio=64.0, head_dim=64, kv_group=1, mlp_ratio=8 / 3, min_layers=2, max_layers=32,
        min_steps=100,
    ))
    config.evaluation = _evaluation(num_trajectories=20, max_examples=0)
  return config
