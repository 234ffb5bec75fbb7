"""Training-step throughput: mlx_med's decoder vs Hugging Face `LlamaForCausalLM` (torch).

CPU mode (default) trains the same Llama-style decoder on both sides: vocab 4096,
d_model 256, 4 layers, 8 heads / 8 KV heads (head_dim 32), SwiGLU MLP 1024, RMSNorm,
RoPE, untied LM head, fp32 parameters and fp32 math, batch 8 x 512 tokens. One step is
the whole training step on both sides: forward, token cross-entropy, backward, global
grad-norm clipping at 1.0, AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1
on matrices only). Ours is `mlx_med.core.train_step.make_train_step` (it also runs its
NaN guard), jitted with the train state donated; torch uses its default SDPA attention
(`attn_implementation="sdpa"`), once eager and once under `torch.compile` (same
weights; `--no-torch-compile` drops that row), with `torch.set_num_threads` equal to
the cores XLA uses. Both are warmed up (compile time is
not counted), then timed in alternating rounds in one process, so a background load
hits both alike; we report medians and ours/torch.

  python bench/train_throughput.py                        # CPU: ours vs torch, ratio
  python bench/train_throughput.py --steps 10 --warmup 3 --json /tmp/train.json
  python bench/train_throughput.py --gpu                  # MFU of a ~300M bf16 config (GPU)

Memory: XLA:CPU allocates one temp buffer per step (~0.8 GB here) and glibc serves such
sizes with a fresh mmap from a per-thread arena, so every step page-faults all of it in
again (~200k faults, ~0.8 s of kernel time per step on 2 cores). By default the bench
re-executes itself once with GLIBC_TUNABLES (one arena, no mmap, no trimming) so freed
memory is reused; this applies to the whole process, i.e. to torch as well.
`--malloc default` keeps glibc's defaults; an existing GLIBC_TUNABLES is left alone.

`--gpu` needs an accelerator: it times our step alone on a ~300M-parameter config
(d_model 1024, 20 layers, 16 heads / 8 KV, MLP 2816, vocab 32768, seq 2048) with
bf16 compute over fp32 master weights, and reports model-FLOPs utilisation from
`mlx_med.core.flops` (6N + attention) against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Llama-ish CPU configuration shared by both sides (the "4 x 256, 8 heads").
CPU_MODEL = dict(vocab_size=4096, num_layers=4, d_model=256, num_heads=8, num_kv_heads=8, mlp_dim=1024)
# ~300M parameters (303M with embeddings) for the GPU MFU mode.
GPU_MODEL = dict(vocab_size=32768, num_layers=20, d_model=1024, num_heads=16, num_kv_heads=8, mlp_dim=2816)
OPTIM = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
ROPE_THETA = 10000.0
NORM_EPS = 1e-6

# glibc settings that keep freed memory in the process (see the module docstring).
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_REEXEC_MARK = "MLX_MED_BENCH_REEXEC"

# Fallback dense bf16 peaks (FLOP/s) when mlx_med.core.flops does not know the device.
_PEAK_BF16 = {
    "H100 SXM": 989e12, "H100": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "A100": 312e12,
    "L40S": 362e12, "TPU v4": 275e12, "TPU v5e": 197e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
}


def _cores() -> int:
  """Cores this process may run on (what XLA:CPU sizes its thread pool by)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _optimizer_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(
      schedule="constant", warmup_steps=0, steps=1_000_000, min_lr_ratio=0.0, decay_fraction=0.0, **OPTIM))


def _decoder_config(model: dict, seq: int, dtype: str, backend: str, remat: str = "none"):
  from mlx_med.core.transformer import DecoderConfig
  return DecoderConfig(**model, max_seq_len=seq, rope_theta=ROPE_THETA, norm_eps=NORM_EPS, dtype=dtype,
                       param_dtype="float32", attention_backend=backend, remat=remat)


def _batch(tokens: np.ndarray) -> dict:
  """Our batch dict from [B, T+1] tokens: predict tokens[:, 1:] from tokens[:, :-1]."""
  import jax.numpy as jnp
  b, t1 = tokens.shape
  t = t1 - 1
  return {
      "inputs": jnp.asarray(tokens[:, :-1]),
      "targets": jnp.asarray(tokens[:, 1:]),
      "segment_ids": jnp.ones((b, t), jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
      "loss_mask": jnp.ones((b, t), jnp.float32),
  }


def make_ours(cfg, tokens: np.ndarray, seed: int = 0) -> tuple[Callable[[], Any], Callable[[], float]]:
  """Returns (step, last_loss): one jitted training step on donated state."""
  import jax

  from mlx_med.core.optim import make_optimizer
  from mlx_med.core.params import init_params
  from mlx_med.core.train_step import init_train_state, make_train_step

  optimizer, schedule = make_optimizer(_optimizer_config())
  params = init_params(cfg, jax.random.key(seed))
  holder = {"state": init_train_state(params, optimizer, seed), "metrics": None}
  try:  # the train step takes a task object (mlx_med.core.lm_task); older trees took the config
    from mlx_med.core.lm_task import DecoderLMTask
    what = DecoderLMTask(cfg, seq_len=tokens.shape[1] - 1)
  except ImportError:
    what = cfg
  step_fn = jax.jit(make_train_step(what, optimizer, schedule), donate_argnums=(0,))
  batch = _batch(tokens)

  def step():
    holder["state"], holder["metrics"] = step_fn(holder["state"], batch)
    jax.block_until_ready(holder["metrics"]["loss"])

  return step, lambda: float(holder["metrics"]["loss"])


def make_torch(tokens: np.ndarray, threads: int, compile_mode: bool, seed: int = 0):
  """Returns (step, last_loss, description) for HF LlamaForCausalLM at CPU_MODEL."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  m = CPU_MODEL
  hf_cfg = transformers.LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["mlp_dim"],
      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
      max_position_embeddings=tokens.shape[1], rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_cfg).train()
  # Same decay mask as mlx_med.core.optim: matrices (Linear / Embedding weights) only.
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  groups = [{"params": decay, "weight_decay": OPTIM["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
  adamw_kwargs = dict(lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
  try:  # the fused CPU kernel is torch's fastest AdamW; fall back where it is missing
    opt = torch.optim.AdamW(groups, fused=True, **adamw_kwargs)
    opt_name = "AdamW(fused)"
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, foreach=True, **adamw_kwargs)
    opt_name = "AdamW(foreach)"
  inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  # HF shifts labels by one inside the loss; giving it the same [B, T] ids trains
  # on T-1 targets per row (ours: T targets from the extra token), same logits work.
  labels = inputs.clone()
  out = {"loss": None}

  # torch.compile wraps the module (forward and, through AOTAutograd, its
  # backward); the optimizer and clipping stay eager, as in the usual recipe.
  forward = torch.compile(model) if compile_mode else model

  def fwd_bwd():
    loss = forward(input_ids=inputs, labels=labels).loss
    loss.backward()
    return loss

  def step():
    opt.zero_grad(set_to_none=True)
    out["loss"] = fwd_bwd().detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
    opt.step()

  desc = (f"transformers {transformers.__version__} LlamaForCausalLM, attn={model.config._attn_implementation}, "
          f"{'torch.compile' if compile_mode else 'eager'}, {opt_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
  return step, lambda: float(out["loss"]), desc


def _timed(step: Callable[[], Any]) -> tuple[float, float]:
  """Wall and process-CPU seconds of one step."""
  c0, t0 = time.process_time(), time.perf_counter()
  step()
  return time.perf_counter() - t0, time.process_time() - c0


def run_cpu(args) -> dict:
  import jax

  from mlx_med.core import flops as flops_lib

  threads = args.threads or _cores()
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(0, CPU_MODEL["vocab_size"], (args.batch, args.seq + 1)).astype(np.int32)
  cfg = _decoder_config(CPU_MODEL, args.seq, "float32", args.backend)
  tokens_per_step = args.batch * args.seq
  train_flops = flops_lib.train_flops_per_token(cfg, args.seq) * tokens_per_step

  sides: dict[str, dict] = {}
  skipped_compile = None
  ours_step, ours_loss = make_ours(cfg, tokens, args.seed)
  t0 = time.perf_counter()
  ours_step()  # compiles
  sides["ours"] = {"step": ours_step, "loss": ours_loss, "compile_s": time.perf_counter() - t0,
                   "desc": f"mlx_med Decoder + make_train_step, attention backend {cfg.attention_backend!r}, "
                           f"jax {jax.__version__} ({jax.default_backend()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"}
  if not args.no_torch:
    torch_step, torch_loss, torch_desc = make_torch(tokens, threads, False, args.seed)
    t0 = time.perf_counter()
    torch_step()
    sides["torch"] = {"step": torch_step, "loss": torch_loss, "compile_s": time.perf_counter() - t0, "desc": torch_desc}
    if not args.no_torch_compile:
      # A second torch side, same weights (same seed) under torch.compile. It needs
      # a working C compiler (inductor's CPU backend); if compiling fails, say why
      # and keep the eager comparison.
      try:
        c_step, c_loss, c_desc = make_torch(tokens, threads, True, args.seed)
        t0 = time.perf_counter()
        c_step()
        sides["torch_compile"] = {"step": c_step, "loss": c_loss, "compile_s": time.perf_counter() - t0,
                                  "desc": c_desc}
      except Exception as e:  # noqa: BLE001 - report and carry on with eager torch
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"torch.compile row skipped: {msg}")
        skipped_compile = msg

  for _ in range(args.warmup):
    for side in sides.values():
      side["step"]()
  for side in sides.values():
    side["wall"], side["cpu"] = [], []
  names = list(sides)
  for i in range(args.steps):
    # Alternate the order each round so slow drift in background load cancels.
    for name in (names if i % 2 == 0 else names[::-1]):
      wall, cpu = _timed(sides[name]["step"])
      sides[name]["wall"].append(wall)
      sides[name]["cpu"].append(cpu)

  result: dict[str, Any] = {
      "mode": "cpu",
      "machine": f"{_cores()}-core CPU ({platform.processor() or platform.machine()}), {platform.system()}",
      "threads": threads,
      "model": {**CPU_MODEL, "head_dim": cfg.resolved_head_dim, "params": cfg.num_params(), "dtype": "float32"},
      "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens_per_step, "steps": args.steps,
      "warmup": args.warmup, "train_flops_per_step": train_flops, "loadavg_after": os.getloadavg(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "torch_compile_skipped": skipped_compile,
  }
  for name, side in sides.items():
    med = statistics.median(side["wall"])
    result[name] = {
        "desc": side["desc"], "median_step_s": med, "min_step_s": min(side["wall"]),
        "median_cpu_s": statistics.median(side["cpu"]), "tokens_per_s": tokens_per_step / med,
        "gflops_per_s": train_flops / med / 1e9, "first_call_s": side["compile_s"], "final_loss": side["loss"](),
        "step_s": side["wall"],
    }
  if "torch" in sides:
    result["ratio_ours_over_torch"] = result["ours"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    paired = [t / o for o, t in zip(sides["ours"]["wall"], sides["torch"]["wall"])]
    result["ratio_paired_median"] = statistics.median(paired)
  if "torch_compile" in sides:
    result["ratio_ours_over_torch_compile"] = result["ours"]["tokens_per_s"] / result["torch_compile"]["tokens_per_s"]
    paired = [t / o for o, t in zip(sides["ours"]["wall"], sides["torch_compile"]["wall"])]
    result["ratio_compile_paired_median"] = statistics.median(paired)

  print(f"machine: {result['machine']}; jax {jax.__version__}; {threads} threads each side; "
        f"GLIBC_TUNABLES={result['glibc_tunables'] or '(unset)'}")
  print(f"model: Llama-style {cfg.num_params() / 1e6:.2f}M params {CPU_MODEL}, fp32; batch {args.batch} x {args.seq}; "
        f"{args.warmup} warm-up + {args.steps} timed steps each, alternating")
  for name in sides:
    r = result[name]
    print(f"{name:>13}: {r['tokens_per_s']:8.0f} tok/s  median {r['median_step_s']:.3f} s/step "
          f"(min {r['min_step_s']:.3f}, cpu {r['median_cpu_s']:.2f} s)  {r['gflops_per_s']:.1f} GFLOP/s  "
          f"loss {r['final_loss']:.4f}  first call {r['first_call_s']:.1f} s")
    print(f"       {r['desc']}")
  if "torch" in sides:
    print(f"ratio ours/torch: {result['ratio_ours_over_torch']:.2f}  (paired per-round median "
          f"{result['ratio_paired_median']:.2f}); load average after: {result['loadavg_after'][0]:.1f}")
  if "torch_compile" in sides:
    print(f"ratio ours/torch.compile: {result['ratio_ours_over_torch_compile']:.2f}  (paired per-round median "
          f"{result['ratio_compile_paired_median']:.2f})")
  return result


def run_gpu(args) -> dict:
  import jax

  from mlx_med.core import flops as flops_lib

  device = jax.devices()[0]
  if device.platform == "cpu":
    raise SystemExit("--gpu needs an accelerator; jax sees only the CPU")
  seq = args.seq if args.seq != 512 else 2048
  batch = args.batch if args.batch != 8 else 16
  backend = args.backend if args.backend != "cpu" else ("cudnn" if device.platform == "gpu" else "xla")
  cfg = _decoder_config(GPU_MODEL, seq, "bfloat16", backend, remat=args.remat)
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  step, loss = make_ours(cfg, tokens, args.seed)
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  walls = [_timed(step)[0] for _ in range(args.steps)]
  med = statistics.median(walls)
  tokens_per_s = batch * seq / med
  peak = flops_lib.device_peak_flops("bfloat16", device)
  if peak is None:
    kind = getattr(device, "device_kind", "")
    peak = next((v for name, v in _PEAK_BF16.items() if name.lower() in kind.lower()), None)
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12
  flops_per_token = flops_lib.train_flops_per_token(cfg, seq)
  achieved = tokens_per_s * flops_per_token
  result = {
      "mode": "gpu", "device": getattr(device, "device_kind", str(device)), "params": cfg.num_params(),
      "model": GPU_MODEL, "dtype": "bfloat16 compute, float32 params", "attention_backend": backend,
      "remat": args.remat, "batch": batch, "seq": seq, "median_step_s": med, "tokens_per_s": tokens_per_s,
      "train_flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
      "peak_tflops": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None,
      "first_call_s": compile_s, "final_loss": loss(), "step_s": walls,
  }
  print(f"device: {result['device']}; model {cfg.num_params() / 1e6:.0f}M params, bf16, batch {batch} x {seq}, "
        f"attention {backend}, remat {args.remat}")
  print(f"{tokens_per_s:,.0f} tok/s, median {med:.3f} s/step, {achieved / 1e12:.1f} TFLOP/s"
        + (f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ", peak unknown (--peak-tflops)"))
  return result


def _reexec_with_malloc_tunables(argv: list[str]) -> None:
  """Restarts this script once with MALLOC_TUNABLES (glibc reads them only at start-up)."""
  if platform.system() != "Linux" or os.environ.get("GLIBC_TUNABLES") or os.environ.get(_REEXEC_MARK):
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, **{_REEXEC_MARK: "1"})
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv, env)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side after the first (compile) call")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
  parser.add_argument("--gpu", action="store_true", help="MFU of a ~300M bf16 config on the accelerator")
  parser.add_argument("--backend", default="cpu", help="our attention backend (default: cpu; --gpu: cudnn)")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: cores XLA uses)")
  parser.add_argument("--no-torch-compile", action="store_true",
                      help="skip the torch.compile side (by default torch runs both eager and compiled)")
  parser.add_argument("--no-torch", action="store_true", help="time ours only")
  parser.add_argument("--remat", default="none", help="--gpu: remat policy (none | dots | full)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="--gpu: override the device's peak")
  parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                      help="retain: re-run with GLIBC_TUNABLES that reuse freed memory (both sides); default: as is")
  parser.add_argument("--seed", type=int, default=0)
  raw_argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(raw_argv)
  if args.malloc == "retain" and argv is None:
    _reexec_with_malloc_tunables(raw_argv)
  result = run_gpu(args) if args.gpu else run_cpu(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
