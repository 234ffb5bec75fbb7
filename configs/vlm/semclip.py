"""SemCLIP: question-guided crops (and visual tokens) for a frozen VLM, at an equal visual-token budget.

  mlx-med vlm semclip --config configs/vlm/semclip.py:smoke --workdir runs/semclip_smoke
  mlx-med vlm semclip --config configs/vlm/semclip.py:smoke --workdir runs/semclip_vstar \
      --config.data.root=/data/vstar_bench
  mlx-med vlm semclip --config configs/vlm/semclip.py:paper --workdir runs/semclip_llava \
      --config.experiment.backend=openai --config.experiment.base_url=http://127.0.0.1:8000/v1

(`mlx_med.vlm.experiment.run_semclip_experiment(config, workdir)` is what the command calls.)

The experiment (`mlx_med.vlm.experiment`): psi (the relevance scorer, `mlx_med.vlm.semclip.train_psi`) is
trained with distant supervision in <workdir>/psi; the frozen VLM is the small LLaVA the project trains
(`mlx_med.vlm.train.train_vlm`, <workdir>/vlm) unless `experiment.backend` points at a served VLM; then,
on each test question, at the same visual-token budget (the overview image + `crops.slots` crop images):
full image, random crop, SemCLIP crop, SemCLIP tokens and oracle crop. Accuracy with Wilson intervals in
results.json, table.md and accuracy.png.

Sections:
  data        the questions: `root` empty -> synthetic V*-style scenes (`mlx_med.vlm.vstar.synth_vstar`,
              `image_size` px, train / eval / test splits of n_train / n_eval / n_test); `root` = a V*
              bench folder (images + JSON) for the experiment's test set (psi and the VLM still train on
              synthetic scenes).
  crops       the multi-scale crop grid (scales, overlap), the distant-supervision rule (cover), the crop
              slots each VLM input holds, and how training fills them.
  vlm         the small VLM (model, train, mesh).
  psi         psi's run config (`mlx_med.vlm.semclip.default_psi_config`; data/geometry follow `data`,
              `crops`).
  experiment  conditions, number of test questions, the backend.

Variants:
  paper  LLaVA-1.5-7B's settings, documented: CLIP ViT-L/14 at 336 px (576 visual tokens per image,
         features of the second-to-last layer, CLS dropped), a 2-layer GELU MLP projector, a Vicuna-7B
         decoder (4096 wide, 32 layers, 32 heads, MLP 11008, 4k context), bf16 with remat; the budget is
         the overview + 1 crop (1152 visual tokens); V*-sized scenes (about 2246 x 1582 px in V* bench;
         1024 px synthetic here). Training a 7B VLM is not this project's business: run `paper` against a
         served LLaVA-1.5 (`experiment.backend=openai`), which only psi is trained for.
  smoke  the demo: 384 px scenes with one 32-48 px target (two for position questions) and no coloured
         distractors, so the target is 5-8 px in the 64 px overview and readable in a crop; a 64 px /
         patch-16 ViT (16 tokens per image) with a 4-layer decoder (d 128), 1200 steps of 32. The VLM
         learns colours within these steps; shapes and positions stay near chance (see README).
"""

import ml_collections

from mlx_med.core.config import default_mesh_config, default_train_config

VARIANTS = ("paper", "smoke")


def _psi(variant: str, image_size: int, n_train: int, crops: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  from mlx_med.vlm.semclip import default_psi_config

  psi = default_psi_config("smoke" if variant == "smoke" else "base")
  psi.data.image_size = image_size
  psi.data.n_train = n_train
  psi.model.scales = tuple(crops.scales)
  psi.model.overlap = float(crops.overlap)
  psi.model.cover = float(crops.cover)
  return psi


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  smoke = variant == "smoke"

  config = ml_collections.ConfigDict()
  config.task = "semclip"
  config.seed = 0

  config.data = ml_collections.ConfigDict({
      "root": "",  # a V* bench folder for the test questions; empty: synthetic scenes
      "image_size": 384 if smoke else 1024,  # synthetic scene size (px)
      # the target's size range (px) and coloured distractor shapes per scene; smoke: larger targets and
      # no distractors (a 64 px VLM trained from scratch for minutes learns colours, not shapes among
      # distractors: measured at chance with 2-4 distractors after 2000 steps)
      "target_size": (32, 48) if smoke else (12, 24),
      "num_distractors": (0, 0) if smoke else (6, 12),
      "n_train": 2000 if smoke else 50000,  # VLM training scenes
      "n_eval": 64 if smoke else 1000,
      "n_test": 300 if smoke else 1000,  # the experiment's questions (synthetic)
      "seed": 0,
      "seq_len": 96 if smoke else 1280,  # tokens per training example (2 images + question + answer)
      "answer_format": "option",  # the VLM answers with the option's text (option) or its letter (letter)
      "worker_count": 0,
  })

  config.crops = ml_collections.ConfigDict({
      "scales": (2, 3, 4),  # the crop grid (scale s: s x s overlapping crops)
      "overlap": 0.25,
      "cover": 0.9,  # a crop is positive iff it holds >= cover of a target box's area
      "slots": 1,  # crop images per VLM input (after the overview); the budget is (1 + slots) images
      "p_target": 0.6,  # training: a crop holding the question's objects
      "p_random": 0.25,  # training: a random crop of the grid (the rest: the whole image)
      "variants": 2,  # crop draws per training scene
  })

  config.vlm = ml_collections.ConfigDict()
  config.vlm.model = ml_collections.ConfigDict({
      "image_size": 64 if smoke else 336,  # the ViT input (px)
      "vision": {"patch_size": 16 if smoke else 14, "width": 96 if smoke else 1024, "depth": 3 if smoke else 24,
                 "num_heads": 4 if smoke else 16, "mlp_dim": 192 if smoke else 4096},
      "text": {"d_model": 128 if smoke else 4096, "num_layers": 4 if smoke else 32, "num_heads": 4 if smoke else 32,
               "num_kv_heads": 4 if smoke else 32, "mlp_dim": 256 if smoke else 11008,
               "max_seq_len": 256 if smoke else 4096, "rope_theta": 10000.0},
      # -1: the last block's output (a tiny tower has no block to spare); LLaVA-1.5 reads -2
      "vision_feature_layer": -1 if smoke else -2,
      "vision_feature_select_strategy": "default",  # default: CLS dropped | full
      "projector_hidden_act": "gelu",
      "dtype": "float32" if smoke else "bfloat16",
      "param_dtype": "float32",
      "remat": not smoke,
  })
  config.vlm.train = default_train_config()
  if smoke:
    config.vlm.train.update({"steps": 1200, "batch_size": 32, "lr": 2e-3, "warmup_steps": 40, "weight_decay": 0.01,
                             "log_every": 20, "eval_every": 200, "eval_batches": 2, "ckpt_every": 200,
                             "async_checkpointing": False})
  else:
    config.vlm.train.update({"steps": 20000, "batch_size": 128, "lr": 2e-5, "warmup_steps": 500,
                             "weight_decay": 0.0, "eval_every": 2000, "ckpt_every": 1000})
  config.vlm.mesh = default_mesh_config()
  if not smoke:
    config.vlm.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

  config.psi = _psi(variant, int(config.data.image_size), 512 if smoke else 20000, config.crops)

  config.experiment = ml_collections.ConfigDict({
      "conditions": ("full_image", "random_crop", "semclip_crop", "semclip_tokens", "oracle_crop"),
      "max_examples": 0,  # 0: every test question
      "seed": 0,  # the random crops
      "batch_size": 16,
      "token_candidates": 4,  # SemCLIP tokens: visual tokens of psi's top crops, this many crops
      "backend": "local",  # local: the trained VLM | openai: a served VLM (base_url, model)
      "base_url": "",
      "model": "",
      "served_tokens_per_image": 576,  # a served VLM's visual tokens per image (LLaVA-1.5: 576), for the budget
      "max_tokens": 8,
  })
  return config
