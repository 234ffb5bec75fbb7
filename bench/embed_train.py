"""Two-tower contrastive train-step throughput: our EmbedTask step against open_clip (torch, CPU).

  python bench/embed_train.py [--batch 64] [--steps 10] [--repeats 3] [--threads 0]

The same tiny ViT-B-like model on both sides: a CLIP-style ViT (64 px, patch 8, width 192,
4 layers, 3 heads, MLP 768, quick-GELU, class-token pooling), a causal text transformer
(context 32, vocab 1000, width 128, 2 layers, 2 heads, MLP 512), projections to 128, a learnable
logit scale, CLIP's symmetric contrastive loss, AdamW, fp32, batch 64 image-text pairs.
Ours is `mlx_med.embed.model.EmbedTask` (UniCL with every label row empty = CLIP's loss) through
the shared trainer's jitted step (`core.train_step.make_train_step`, gradient clipping and the
NaN guard included). open_clip is its `CLIP` model with `ClipLoss` and torch.optim.AdamW (no
clipping), timed eager and under torch.compile (its strongest ordinary settings); the faster
counts for the ratio and both are printed. Compilation is left out on both sides; each side is
timed `--repeats` times, alternating, and the best run counts (the machine may be shared).
Prints the load average, images/s of each and the ratio ours / open_clip.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP = 64, 8, 192, 4, 3, 768
CONTEXT, VOCAB, T_WIDTH, T_DEPTH, T_HEADS, T_MLP = 32, 1000, 128, 2, 2, 512
EMBED = 128


def make_batch(batch: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  ids = rng.integers(1, VOCAB - 1, (batch, CONTEXT)).astype(np.int32)
  lengths = rng.integers(4, CONTEXT, batch)
  for i, n in enumerate(lengths):
    ids[i, n] = VOCAB - 1  # end token: the pooled position (our first-EOS rule, open_clip's argmax rule)
    ids[i, n + 1:] = 0
  return images, ids


def ours_step(batch: int):
  import jax
  import jax.numpy as jnp

  from mlx_med.core import config as config_lib, optim, params as params_lib
  from mlx_med.core.train_step import init_train_state, make_train_step
  from mlx_med.embed.model import EmbedTask, TwoTowerConfig
  from mlx_med.vision.text import TextConfig
  from mlx_med.vision.vit import ViTConfig

  cfg = TwoTowerConfig(
      image=ViTConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP),
      text=TextConfig(vocab_size=VOCAB, context_length=CONTEXT, width=T_WIDTH, depth=T_DEPTH, num_heads=T_HEADS,
                      mlp_dim=T_MLP, eos_token_id=VOCAB - 1, pad_token_id=0),
      embed_dim=EMBED)
  task = EmbedTask(cfg, loss="unicl", num_labels=1)
  t = config_lib.default_train_config()
  t.update(dict(steps=1000, warmup_steps=10, lr=1e-4, weight_decay=0.2))
  optimizer, schedule = optim.make_optimizer(t)
  state = init_train_state(params_lib.init_params(task, jax.random.key(0)), optimizer, 0)
  step = jax.jit(make_train_step(task, optimizer, schedule), donate_argnums=(0,))
  images, ids = make_batch(batch)
  data = {"images": jnp.asarray(images), "text_ids": jnp.asarray(ids), "labels": jnp.zeros((batch, 1), jnp.int32)}
  holder = {"state": state}

  def run(n: int) -> None:
    s = holder["state"]
    for _ in range(n):
      s, metrics = step(s, data)
    jax.block_until_ready(metrics["loss"])
    holder["state"] = s

  n_params = params_lib.count_params(state["params"])
  return run, n_params


def open_clip_step(batch: int, compiled: bool):
  import numpy as np
  import torch

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
  from torch_peers import import_open_clip

  open_clip = import_open_clip()
  torch.manual_seed(0)
  vision = open_clip.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=MLP / WIDTH,
                                   patch_size=PATCH, image_size=IMAGE)
  text = open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=T_WIDTH, heads=T_HEADS,
                               layers=T_DEPTH, mlp_ratio=T_MLP / T_WIDTH)
  model = open_clip.CLIP(EMBED, vision, text, quick_gelu=True)
  model.train()
  loss_fn = open_clip.ClipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2, betas=(0.9, 0.95), eps=1e-8)
  images, ids = make_batch(batch)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  t = torch.from_numpy(ids.astype(np.int64))

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    image_features, text_features, logit_scale = model(x, t)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    optimizer.step()
    return loss

  fn = torch.compile(train_step) if compiled else train_step

  def run(n: int) -> None:
    for _ in range(n):
      loss = fn()
    float(loss)

  return run, sum(p.numel() for p in model.parameters())


def best_rate(run, batch: int, steps: int) -> float:
  start = time.perf_counter()
  run(steps)
  return batch * steps / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores)")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
  args = p.parse_args()

  import torch
  torch.set_num_threads(args.threads or os.cpu_count() or 1)

  runners = {}
  start = time.perf_counter()
  ours, n_ours = ours_step(args.batch)
  ours(1)  # compile + first step
  print(f"ours: {n_ours:,} parameters; compile + first step {time.perf_counter() - start:.1f} s", flush=True)
  runners["ours (jax.jit)"] = ours
  eager, n_peer = open_clip_step(args.batch, compiled=False)
  eager(2)
  print(f"open_clip: {n_peer:,} parameters", flush=True)
  runners["open_clip eager"] = eager
  if not args.no_compile:
    try:
      start = time.perf_counter()
      comp, _ = open_clip_step(args.batch, compiled=True)
      comp(2)
      print(f"open_clip torch.compile: compile + 2 steps {time.perf_counter() - start:.1f} s", flush=True)
      runners["open_clip torch.compile"] = comp
    except Exception as e:  # a compiler toolchain may be missing on a bare machine
      print(f"open_clip torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

  rates = {name: 0.0 for name in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      rates[name] = max(rates[name], best_rate(run, args.batch, args.steps))
  load = os.getloadavg()
  print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; batch {args.batch}, "
        f"{args.steps} steps x {args.repeats} repeats, best run")
  for name, rate in rates.items():
    print(f"  {name:26s} {rate:8.1f} images/s")
  peer = max(v for k, v in rates.items() if k.startswith("open_clip"))
  print(f"ratio ours / open_clip (best of eager, compiled): {rates['ours (jax.jit)'] / peer:.2f}x")


if __name__ == "__main__":
  main()
