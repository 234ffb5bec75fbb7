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

Paper scale (`--gpu`, or `--paper` on any backend):

  python bench/embed_train.py --gpu [--batch 128] [--steps 5] [--json OUT]
  python bench/embed_train.py --paper --towers smoke --batch 4 --steps 2   # the same path on a CPU

trains the `paper` variant of configs/embed/medimageinsight.py: DaViT (360M parameters, 480 px)
and the 1024-wide, 16-layer text tower (CLIP's 49408-token vocabulary), shared embedding 1024,
UniCL over 8 multi-hot labels, bf16 compute over fp32 parameters, remat, AdamW + the EMA of the
config, through the trainer's own pieces: its mesh and shardings (`core.trainer.mesh_from_config`,
`state_shardings`, `batch_shardings`), its memory check (`core.trainer.check_memory`, refusing a
batch that cannot fit before anything is compiled) and `core.train_step.make_train_step`.
Reports images/s, the median step time, MFU (`EmbedTask.train_flops_per_example` against the
device's dense bf16 peak, looked up as bench/train_throughput.py --gpu does) and XLA's compiled
memory analysis beside our estimate. `--towers smoke` swaps in the smoke DaViT and a small text
tower (same code path, CPU-sized); `--image-size` and `--no-remat` override the config.

Batch 128 on one H200 (141 GB, ~127 GB within the check's 90% headroom): 617M parameters in fp32
are 2.5 GB, AdamW moments 4.9 GB, EMA 2.5 GB, gradients and update temporaries ~5 GB (~15 GB);
`EmbedTask.activation_bytes_per_example` is 0.69 GB with remat (2.26 GB without), so 128 pairs
need ~88 GB of activations (~103 GB in all). Without remat 128 would need ~290 GB: the memory
check refuses it.
--gpu exits 1 when JAX sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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

  from mlx_med.core import config as config_lib
  from mlx_med.core import optim
  from mlx_med.core import params as params_lib
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
  t.update({"steps": 1000, "warmup_steps": 10, "lr": 1e-4, "weight_decay": 0.2})
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


# ----------------------------------------------------------------------------- paper scale

PAPER_VOCAB, PAPER_LABELS = 49408, 8  # CLIP's tokenizer; multi-hot labels per pair


def paper_config(towers: str = "paper", image_size: int = 0, remat: bool = True, batch: int = 128):
  """The `paper` variant's config with the tokenizer-dependent fields filled (CLIP's vocabulary)."""
  from configs.embed.medimageinsight import _text, get_config

  config = get_config("paper")
  if towers == "smoke":  # CPU-sized towers of the same kinds, through the same code path
    import dataclasses

    import ml_collections

    from mlx_med.vision.davit import DaViTConfig
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(DaViTConfig.smoke()).items()}
    values.update(kind="davit", dtype="bfloat16", param_dtype="float32", remat=True)
    config.model.image = ml_collections.ConfigDict(values)
    config.model.text = _text(16, 64, 2, 4, 256, dtype="bfloat16", remat=True)
    config.model.embed_dim = 64
  elif towers != "paper":
    raise SystemExit(f"--towers {towers!r}: choose paper or smoke")
  text = config.model.text
  text.vocab_size = 1000 if towers == "smoke" else PAPER_VOCAB
  text.eos_token_id = text.pad_token_id = text.vocab_size - 1
  if image_size:
    config.model.image.image_size = int(image_size)
  config.model.image.remat = config.model.text.remat = bool(remat)
  config.train.batch_size = int(batch)
  return config


def _peak_flops(device, override_tflops: float = 0.0) -> float | None:
  """Dense bf16 peak of the device: mlx_med.core.flops, then bench/train_throughput.py's fallback table."""
  if override_tflops:
    return override_tflops * 1e12
  from mlx_med.core import flops as flops_lib
  peak = flops_lib.device_peak_flops("bfloat16", device)
  if peak is None:  # the same fallback table as train_throughput.py --gpu
    from train_throughput import _PEAK_BF16
    kind = getattr(device, "device_kind", "").lower()
    peak = next((v for name, v in _PEAK_BF16.items() if name.lower() in kind), None)
  return peak


def paper_batch(cfg, batch: int, seed: int = 0) -> dict:
  import numpy as np
  rng = np.random.default_rng(seed)
  s, length, vocab = cfg.image_size, cfg.context_length, cfg.text.vocab_size
  ids = rng.integers(1, vocab - 1, (batch, length)).astype(np.int32)
  for i, n in enumerate(rng.integers(4, length - 1, batch)):
    ids[i, n:] = vocab - 1  # the end token (pooled at its first occurrence), then padding
  return {"images": rng.normal(size=(batch, s, s, 3)).astype(np.float32), "text_ids": ids,
          "labels": (rng.random((batch, PAPER_LABELS)) < 0.15).astype(np.int32)}


def run_paper(args) -> dict:
  import flax.linen as nn
  import jax

  if args.gpu and jax.default_backend() != "gpu":
    print(f"embed_train --gpu: FAIL: JAX's default backend is {jax.default_backend()!r}, not 'gpu' "
          f"(devices {jax.devices()}); run on a GPU machine, or use --paper --towers smoke on a CPU",
          file=sys.stderr)
    sys.exit(1)
  from mlx_med.core import memory as memory_lib
  from mlx_med.core import optim
  from mlx_med.core import params as params_lib
  from mlx_med.core import trainer as trainer_lib
  from mlx_med.core.train_step import init_train_state, make_train_step
  from mlx_med.embed.model import EmbedTask, two_tower_config

  batch_size = args.batch or 128
  config = paper_config(args.towers, args.image_size, not args.no_remat, batch_size)
  m = config.model
  cfg = two_tower_config(m)
  task = EmbedTask(cfg, loss=m.loss, siglip_chunked=bool(m.siglip_chunked), max_logit_scale=float(m.max_logit_scale),
                   num_labels=PAPER_LABELS)
  device = jax.devices()[0]
  print(f"device: {getattr(device, 'device_kind', device)} ({jax.default_backend()}, {jax.device_count()} device(s)), "
        f"jax {jax.__version__}; {task.describe()}, batch {batch_size}, remat {not args.no_remat}", flush=True)
  try:
    est = trainer_lib.check_memory(config, task, what=f"the paper-scale train step at batch {batch_size}")
  except memory_lib.MemoryBudgetError as e:
    print(f"embed_train: FAIL: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"memory estimate: {est.describe()}", flush=True)

  t = config.train
  seed, ema_decay = int(config.seed), float(t.ema_decay)
  _, rules = trainer_lib.mesh_from_config(config)
  optimizer, schedule = optim.make_optimizer(t)
  _, shardings = trainer_lib.state_shardings(task, optimizer, rules, seed, ema_decay > 0)
  b_shard = trainer_lib.batch_shardings(task, rules)
  start = time.perf_counter()
  state = jax.jit(lambda: init_train_state(nn.unbox(task.init(jax.random.key(seed))), optimizer, seed, ema_decay > 0),
                  out_shardings=shardings)()
  n_params = params_lib.count_params(state["params"])
  batch = jax.device_put(paper_batch(cfg, batch_size, seed), b_shard)
  step = jax.jit(make_train_step(task, optimizer, schedule, 1, rules, ema_decay),
                 in_shardings=(shardings, b_shard), out_shardings=(shardings, None), donate_argnums=(0,))
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  xla = None
  if mem is not None:
    xla = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                             "alias_size_in_bytes", "generated_code_size_in_bytes")
           if hasattr(mem, k)}
  print(f"{n_params:,} parameters; init + compile {compile_s:.1f} s", flush=True)

  holder = {"state": state, "metrics": None}

  def one() -> float:
    t0 = time.perf_counter()
    holder["state"], holder["metrics"] = compiled(holder["state"], batch)
    jax.block_until_ready(holder["metrics"]["loss"])
    return time.perf_counter() - t0

  first_s = one()
  for _ in range(args.warmup):
    one()
  walls = [one() for _ in range(args.steps)]
  med = statistics.median(walls)
  images_per_s = batch_size / med
  flops = task.train_flops_per_example
  peak = _peak_flops(device, args.peak_tflops)
  achieved = images_per_s * flops if flops else None
  mfu = achieved / peak if achieved and peak else None
  per_example = task.activation_bytes_per_example()
  result = {
      "mode": "gpu" if args.gpu else "paper", "device": getattr(device, "device_kind", str(device)),
      "backend": jax.default_backend(), "jax": jax.__version__, "towers": args.towers, "model": task.describe(),
      "params": n_params, "image_size": cfg.image_size, "context_length": cfg.context_length,
      "dtype": "bfloat16 compute, float32 params", "remat": not args.no_remat, "ema_decay": ema_decay,
      "batch": batch_size, "steps": args.steps, "warmup": args.warmup, "median_step_s": med, "min_step_s": min(walls),
      "images_per_s": images_per_s, "train_flops_per_example": flops,
      "achieved_tflops": achieved / 1e12 if achieved else None, "peak_tflops": peak / 1e12 if peak else None,
      "mfu": mfu, "init_compile_s": compile_s, "first_step_s": first_s,
      "final_loss": float(holder["metrics"]["loss"]), "step_s": walls,
      "memory_estimate": {"params": est.params, "optimizer": est.optimizer, "activations": est.activations,
                          "activation_bytes_per_example": per_example, "total": est.total},
      "xla_memory_analysis": xla,
  }
  print(f"{images_per_s:,.1f} images/s, median {med:.3f} s/step (min {min(walls):.3f}, first {first_s:.2f} s), "
        f"loss {result['final_loss']:.4f}")
  if achieved:
    print(f"{achieved / 1e12:.3g} TFLOP/s from {flops / 1e9:.3g} train GFLOPs/image"
          + (f", MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if mfu else
             ", peak unknown (pass --peak-tflops)"))
  if xla:
    used = xla.get("argument_size_in_bytes", 0) + xla.get("temp_size_in_bytes", 0)
    print(f"XLA memory: arguments {xla.get('argument_size_in_bytes', 0) / 1e9:.2f} GB + temp "
          f"{xla.get('temp_size_in_bytes', 0) / 1e9:.2f} GB = {used / 1e9:.2f} GB; our estimate {est.total / 1e9:.2f} GB "
          f"(activations {per_example / 1e6:.1f} MB/example; estimate / XLA {est.total / max(used, 1):.2f})")
  return result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=0, help="pairs per step (default: 64 CPU comparison, 128 paper)")
  p.add_argument("--steps", type=int, default=0, help="timed steps (default: 10 CPU comparison, 5 paper)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores)")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
  p.add_argument("--gpu", action="store_true", help="paper-scale train step on the GPU (exit 1 without one)")
  p.add_argument("--paper", action="store_true", help="paper-scale train step on whatever backend JAX has")
  p.add_argument("--towers", default="paper", help="paper mode: paper | smoke (CPU-sized, same code path)")
  p.add_argument("--image-size", type=int, default=0, help="paper mode: override the image size")
  p.add_argument("--no-remat", action="store_true", help="paper mode: turn remat off in both towers")
  p.add_argument("--warmup", type=int, default=2, help="paper mode: untimed steps after the first")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="paper mode: override the device's bf16 peak")
  p.add_argument("--json", metavar="OUT", help="paper mode: write every figure to this JSON file")
  args = p.parse_args()
  if args.gpu or args.paper:
    args.steps = args.steps or 5
    result = run_paper(args)
    if args.json:
      tmp = args.json + ".tmp"
      with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
      os.replace(tmp, args.json)
      print(f"wrote {args.json}")
    return
  args.batch, args.steps = args.batch or 64, args.steps or 10
  cpu_comparison(args)


def cpu_comparison(args) -> None:
  """Ours vs open_clip on the tiny CPU config (the module docstring's first part)."""
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
