"""BoltzFormer: text-prompted segmentation of small objects with Boltzmann-sampled masked attention.

  mlx-med seg train --config configs/seg/boltzformer.py:smoke --workdir runs/seg_smoke
  mlx-med seg train --config configs/seg/boltzformer.py:paper --workdir runs/boltzformer \
      --config.data.root=/data/Task06_Lung --config.data.format=msd
  mlx-med seg compare --config configs/seg/boltzformer.py:smoke --workdir runs/seg_compare \
      --modes boltzmann,threshold,full

The decoder follows the public release: 9 layers, each masked cross-attention to one pixel-decoder
level (1/32, 1/16, 1/8 in turn) -> self-attention over [queries ‖ text tokens] -> FFN; the mask a layer
attends under comes from the previous layer's prediction. `model.attention` picks how:
  boltzmann      keys with sigmoid >= 0.5 plus keys Boltzmann-sampled from the rest (T = 1 / (2 + layer),
                 int(0.1 N) draws, kept iff drawn), computed by the block-sparse Pallas kernel on GPU/TPU
                 and its XLA path on CPU (`model.kernel_backend`);
  dense_sampled  the same samples computed densely under a full masked matrix (the release's way);
  threshold      Mask2Former's masked attention (sigmoid > 0.5);
  full           no mask.
Every mode has the same parameters, so one checkpoint is evaluated under each.

Data (`data`): `root` empty -> synthetic CT-like slices with small lesions in three size buckets
(< 0.1%, 0.1-1%, > 1% of the image) are generated into <workdir>/synthetic (or `data.synthetic_dir`).
Real layouts: `format=msd` (a Medical Segmentation Decathlon task folder: dataset.json, imagesTr/,
labelsTr/; axial slices holding a label, prompt "<label> in <modality> scan"), `format=dicom` (one
folder per series with its mask), `format=png` (image/mask pairs with metadata.csv, or images/ + masks/
and `data.prompt`). `tokenizer` empty -> a byte-level BPE tokenizer trained on the training prompts.

Variants:
  paper  512 px, DaViT image tower (MedImageInsight's, 1/4..1/32 stages), 6-layer transformer FPN
         pixel decoder (512 wide), 12-layer 512-wide text tower, 101 queries, hidden 512, 8 heads,
         9 decoder layers; AdamW 1e-4, batch 16, bf16 with remat, FSDP mesh.
  smoke  128 px, a ~1M-parameter DaViT, small pixel decoder / text tower, 16 queries, hidden 64,
         4 heads, 9 decoder layers on the synthetic slices (CPU, minutes).
"""

import ml_collections

from mlx_med.core.config import default_mesh_config, default_train_config

VARIANTS = ("paper", "smoke")


def _davit(dims, depths, heads, window, image_size, dtype="float32", remat=False, drop_path=0.0):
  return ml_collections.ConfigDict({
      "kind": "davit", "dims": dims, "depths": depths, "heads": heads, "window_size": window,
      "patch_sizes": (7, 3, 3, 3), "strides": (4, 2, 2, 2), "image_size": image_size, "channel_attention": "v2",
      "drop_path_rate": drop_path, "dtype": dtype, "param_dtype": "float32", "remat": remat})


def _text(context_length, width, depth, heads, mlp_dim, dtype="float32", remat=False):
  return ml_collections.ConfigDict({
      "vocab_size": 0,  # 0: the tokenizer's vocabulary size
      "context_length": context_length, "width": width, "depth": depth, "num_heads": heads, "mlp_dim": mlp_dim,
      "style": "clip", "act": "quick_gelu", "layer_norm_eps": 1e-5,
      "eos_token_id": -1, "pad_token_id": -1,  # -1: the tokenizer's
      "dtype": dtype, "remat": remat})


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  smoke = variant == "smoke"
  size = 128 if smoke else 512

  config = ml_collections.ConfigDict()
  config.task = "boltzformer"
  config.seed = 0
  config.peak_flops_per_device = 0.0

  config.data = ml_collections.ConfigDict({
      "root": "",  # a dataset folder (see format); empty: synthetic CT-like slices
      "format": "png",  # png | msd | dicom
      "prompt": "",  # png/dicom without per-image prompts: the prompt of every target
      "synthetic_dir": "",  # where synthetic data goes (empty: <workdir>/synthetic); shared by compare runs
      "synth_train": 3000 if smoke else 20000,
      "synth_test": 300 if smoke else 2000,
      "synth_seed": 0,
      "train_split": "train",
      "eval_split": "test",
      "channel": 0,  # msd: the modality channel of 4-D images
      "window": "auto",  # intensity window for CT/MR (mlx_med.vision.io presets, "header", or "auto")
      "tokenizer": "",  # a tokenizer.json (CLIP's); empty: BPE trained on the training prompts
      "tokenizer_vocab_size": 512 if smoke else 4096,
      "source": "memory" if smoke else "tfds",  # memory: decoded once, in RAM | tfds: ArrayRecord, lazy
      "tfds_dir": "",
      "worker_count": 0 if smoke else 8,
  })

  config.model = ml_collections.ConfigDict({
      "image_size": size,
      "hidden_dim": 64 if smoke else 512,
      "num_queries": 16 if smoke else 101,
      "num_heads": 4 if smoke else 8,
      "dec_layers": 9,
      "dim_feedforward": 128 if smoke else 2048,
      "mask_dim": 64 if smoke else 512,
      "pixel_decoder_layers": 2 if smoke else 6,
      "pixel_decoder_dim": 64 if smoke else 512,
      "pixel_decoder_heads": 4 if smoke else 8,
      "pixel_decoder_ffn": 128 if smoke else 2048,
      "attention": "boltzmann",  # boltzmann | dense_sampled | threshold | full
      "sample_ratio": 0.1,
      "base_temp": 1.0,
      "mask_threshold": 0.5,
      "sampler": "bernoulli",  # bernoulli (the release: independent keeps with the exact marginal) | draws
      "kernel_backend": "auto",  # auto | xla | pallas | pallas_interpret | reference
      "fusion": True,
      "fusion_channels": 10,
      "dtype": "float32" if smoke else "bfloat16",
      "param_dtype": "float32",
      "remat": not smoke,
  })
  if smoke:
    config.model.encoder = _davit((32, 64, 96, 128), (1, 1, 1, 1), (2, 2, 4, 4), 4, size)
    config.model.text = _text(16, 64, 2, 4, 128)
  else:
    config.model.encoder = _davit((256, 512, 1024, 2048), (1, 1, 9, 1), (8, 16, 32, 64), 12, size,
                                  dtype="bfloat16", remat=True, drop_path=0.1)
    config.model.text = _text(77, 512, 12, 8, 2048, dtype="bfloat16", remat=True)
  # A MedImageInsight run directory (`mlx-med embed train`) whose DaViT image tower initialises the encoder.
  config.model.encoder_init_from = ""

  config.train = default_train_config()
  if smoke:
    config.train.update({"steps": 400, "batch_size": 16, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.05,
                         "log_every": 20, "eval_every": 200, "eval_batches": 4, "ckpt_every": 200})
  else:
    config.train.update({"steps": 50000, "batch_size": 16, "lr": 1e-4, "warmup_steps": 1000, "weight_decay": 0.05,
                         "eval_every": 2000, "ckpt_every": 1000})

  config.eval = ml_collections.ConfigDict({
      "split": "test",
      "max_images": 0,  # 0 = the whole split
      "batch_size": 16,
      "n_boot": 1000,
      "threshold": 0.5,
      "sample_seed": 0,  # the Boltzmann samples at evaluation
      "plot_examples": 4,  # kept-keys figures for this many small-object examples
  })

  config.mesh = default_mesh_config()
  if not smoke:
    config.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  return config
