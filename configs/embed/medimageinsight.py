"""MedImageInsight: two-tower image-text-label contrastive embeddings (UniCL or SigLIP loss).

CPU smoke run (synthetic multi-domain images are generated into the workdir, a BPE
tokenizer is trained on their reports; a few minutes on 2 cores):
  mlx-med train --config configs/embed/medimageinsight.py:smoke --workdir runs/embed_smoke

Your own images (a folder with images and a metadata.csv with columns path, split, domain,
labels (";"-joined), report) and CLIP's tokenizer.json:
  mlx-med train --config configs/embed/medimageinsight.py:paper --workdir runs/mii \
      --config.data.folder=/data/my_images --config.data.tokenizer=/models/clip/tokenizer.json

Start from a Hugging Face CLIP or SigLIP directory (config.json + model.safetensors; its
towers, projections, logit scale and tokenizer replace model.image/model.text):
  mlx-med train --config configs/embed/medimageinsight.py:vit_b16 --workdir runs/mii_clip \
      --config.model.init_from=/models/clip-vit-base-patch16 --config.data.folder=/data/my_images

Variants:
  paper    DaViT image tower (DaViTConfig.medimageinsight(): dims 256-2048, depths 1-1-9-1,
           480 px), text transformer width 1024 / 16 layers / 16 heads / context 77, shared
           embedding 1024, UniCL, AdamW wd 0.2, cosine, EMA 0.999, FSDP mesh (accelerators).
  vit_b16  ViT-B/16 CLIP-style image tower at 224 px, CLIP-B text tower, embedding 512.
  siglip   a SigLIP-style ViT-B/16 (attention pooling) and the vit_b16 text tower, trained with the
           sigmoid loss (chunked across the batch devices).
  smoke    tiny ViT at 64 px and a small text tower on the synthetic data (CPU, minutes).

Data (`data`): `folder` empty -> the synthetic generator writes `synth_train` + `synth_test`
images into <workdir>/synthetic. `tokenizer` empty -> a byte-level BPE tokenizer of
`tokenizer_vocab_size` tokens is trained on the training reports and saved as
<workdir>/tokenizer.json (users of real data should pass CLIP's tokenizer.json instead).
`source`: "memory" decodes every image once and keeps it in RAM as uint8 (the smoke run); "tfds"
converts the folder once into ArrayRecord files (`embed.data.build_tfds`) read lazily by grain
workers. `augment`: random resized crop, optional flip and brightness/contrast jitter of the
training images (on for paper, vit_b16 and siglip; off for smoke), e.g.
`--config.data.augment.scale="(0.5, 1.0)"` or `--config.data.augment.enabled=False`.
The run directory also gets model.json (the resolved towers), processor.json (resize and
normalisation) and labels.json, which `Embedder.load(workdir)` reads.
"""

import ml_collections

from mlx_med.core.config import default_mesh_config, default_train_config

VARIANTS = ("paper", "vit_b16", "siglip", "smoke")


def _vit(image_size, patch_size, width, depth, heads, mlp_dim, style="clip", act="quick_gelu", pool="cls",
         dtype="float32", remat=False):
  return ml_collections.ConfigDict({
      "kind": "vit", "image_size": image_size, "patch_size": patch_size, "width": width, "depth": depth, "num_heads": heads,
      "mlp_dim": mlp_dim, "style": style, "act": act, "layer_norm_eps": 1e-5, "pool": pool, "dtype": dtype,
      "param_dtype": "float32", "remat": remat})


def _davit_paper(dtype="bfloat16", remat=True):
  """The MedImageInsight DaViT preset (DaViTConfig.medimageinsight()) as a config section."""
  import dataclasses

  from mlx_med.vision.davit import DaViTConfig

  values = dataclasses.asdict(DaViTConfig.medimageinsight())
  values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
  values.update(kind="davit", dtype=dtype, param_dtype="float32", remat=remat)
  return ml_collections.ConfigDict(values)


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

  config = ml_collections.ConfigDict()
  config.task = "medimageinsight"
  config.seed = 0
  config.peak_flops_per_device = 0.0  # 0 = look up the device; set for unknown hardware

  config.data = ml_collections.ConfigDict({
      "folder": "",  # images + metadata.csv (path, split, domain, labels, report); empty: synthetic
      "synth_train": 6000 if smoke else 20000,
      "synth_test": 600 if smoke else 2000,
      "synth_seed": 0,
      # Size of the synthetic findings (embed.synth's difficulty knob, 1 = its default). The smoke
      # demo (700 steps) measured zero-shot mean AUC 0.949 at 1.3 and 0.864 at 1.0 (bar 0.85): 1.3
      # keeps a margin; the smallest findings (a 2-px calcification, a lung nodule) need it at 64 px.
      "synth_finding_scale": 1.3 if smoke else 1.0,
      "tokenizer": "",  # a tokenizer.json (CLIP's); empty: train a BPE tokenizer on the training reports
      "tokenizer_vocab_size": 1024 if smoke else 8192,
      "processor": "clip",  # normalisation: clip | siglip (mean/std of the checkpoint's processor)
      "source": "memory" if smoke else "tfds",  # memory: decoded once, in RAM | tfds: ArrayRecord, read lazily
      "tfds_dir": "",  # data.source=tfds: where the ArrayRecord files go; empty: <workdir>/tfds
      "train_split": "train",
      "eval_split": "test",
      "worker_count": 0 if smoke else 8,  # grain worker processes (lazy tfds records decode there)
      # Training augmentation (embed.data.Augment), drawn anew every epoch by the trainer's loader;
      # evaluation never augments. A random resized crop over `scale` (area fractions) and `ratio`,
      # horizontal flips (off: left and right matter in medical images), brightness/contrast jitter
      # half-widths. Off for smoke: its demo bar was measured without it (zero-shot AUC 0.948).
      "augment": ml_collections.ConfigDict({
          "enabled": not smoke, "scale": (0.7, 1.0), "ratio": (3 / 4, 4 / 3), "flip": False, "brightness": 0.1, "contrast": 0.1}),
  })

  config.model = ml_collections.ConfigDict()
  config.model.init_from = ""  # a Hugging Face CLIP/SigLIP directory: its towers replace image/text
  config.model.loss = "unicl"  # unicl | siglip
  config.model.siglip_chunked = False  # siglip: chunked over the batch devices (shard_map + ppermute)
  config.model.logit_scale_init = 2.6592600369262695  # log(1 / 0.07), CLIP's init
  config.model.logit_bias_init = -10.0  # siglip only
  config.model.max_logit_scale = 100.0  # CLIP clamps exp(logit_scale) at 100 (UniCL loss only)

  if variant == "paper":
    config.model.image = _davit_paper()
    config.model.text = _text(77, 1024, 16, 16, 4096, dtype="bfloat16", remat=True)
    config.model.embed_dim = 1024
  elif variant in ("vit_b16", "siglip"):
    config.model.image = _vit(224, 16, 768, 12, 12, 3072, dtype="bfloat16", remat=True)
    config.model.text = _text(77, 512, 12, 8, 2048, dtype="bfloat16", remat=True)
    config.model.embed_dim = 512
    if variant == "siglip":  # SigLIP's image tower: no class token, attention-pooling head
      config.model.image = _vit(224, 16, 768, 12, 12, 3072, style="siglip", act="gelu_tanh", pool="map",
                                dtype="bfloat16", remat=True)
      config.model.loss = "siglip"
      config.model.siglip_chunked = True
      config.model.logit_scale_init = 2.302585092994046  # log(10), SigLIP's init
      config.data.processor = "siglip"
  else:  # smoke
    config.model.image = _vit(64, 8, 128, 4, 4, 512)
    config.model.text = _text(32, 128, 2, 4, 512)
    config.model.embed_dim = 128

  config.train = default_train_config()
  if smoke:
    config.train.update({"steps": 700, "batch_size": 64, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.05,
                             "b2": 0.98, "eps": 1e-6, "log_every": 20, "eval_every": 200, "eval_batches": 4, "ckpt_every": 200,
                             "ema_decay": 0.99})
  else:
    # MedImageInsight: AdamW with weight decay 0.2, cosine schedule, EMA 0.999.
    config.train.update({"steps": 100000, "batch_size": 1024, "lr": 5e-4, "warmup_steps": 5000, "weight_decay": 0.2,
                             "b2": 0.98, "eps": 1e-6, "eval_every": 5000, "ckpt_every": 2000, "ema_decay": 0.999})
  config.mesh = default_mesh_config()
  if not smoke:  # parameters and optimizer state sharded across the batch devices (FSDP)
    config.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  return config
