"""Greedy generation throughput: mlx_med's sampler vs transformers `generate` (torch, CPU).

Both run the same random checkpoint (a Qwen2-style decoder with q/k/v biases and tied
embeddings, ~40M parameters: vocab 32000, d_model 512, 8 layers, 8 heads / 2 KV heads,
MLP 1536) on the same left-padded prompts (16-64 tokens), greedy, exactly 128 new tokens
(no EOS), at batch 1, 8 and 32. Each side is warmed up once per batch size (compile /
first-call costs excluded), then timed; tokens/s counts generated tokens only. torch
gets as many threads as XLA uses (the cores this process may run on; --threads N to
change), as in bench/train_throughput.py.

  python bench/generate_throughput.py                 # CPU comparison (prints a table and ratios)
  python bench/generate_throughput.py --per-step 32   # decode-step latency, ours vs torch (min/median)
  python bench/generate_throughput.py --gpu           # decode tokens/s of a ~1B config, batch 32, bf16

The --gpu mode needs an accelerator and random weights only (no torch comparison there).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np


def random_qwen2_checkpoint(directory: str, seed: int = 0, eos_token_id: int | None = None) -> str:
  """The benchmark model (40.5M Qwen2-style, fp32, random weights) written by transformers into `directory`."""
  import transformers

  cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=0)
  return save_random_qwen2(directory, cfg, seed)


def save_random_qwen2(directory: str, cfg, seed: int = 0) -> str:
  """A transformers Qwen2 of config `cfg` with random weights (std 0.05, norms near 1) saved to `directory`."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 + 0.05 * torch.randn_like(p)) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
  model.tie_weights()
  model.save_pretrained(directory)
  return directory


def _cores() -> int:
  """Cores this process may run on: what XLA:CPU sizes its thread pool by."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _pin_torch_threads(threads: int | None) -> int:
  """torch gets as many intra-op threads as XLA uses (or `threads`), as in bench/train_throughput.py."""
  import torch

  threads = threads or _cores()
  torch.set_num_threads(threads)
  return threads


def _prompts(batch: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 32000, int(rng.integers(16, 65))).tolist() for _ in range(batch)]


def _time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def run_cpu(batches: list[int], new_tokens: int, repeats: int, threads: int | None) -> None:
  import jax
  import torch
  import transformers

  from mlx_med.core.sampler import Sampler, SamplingParams
  from mlx_med.llm import checkpoint, hf_config

  _pin_torch_threads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    path = random_qwen2_checkpoint(tmp)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = hf_config.decoder_config_from_hf(hf_config.read_hf_config(path), scan_layers=False)
    params = checkpoint.load_hf_params(path, cfg)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  sampler = Sampler(cfg, pad_id=0)
  greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  print(f"model: Qwen2-style, {n_params / 1e6:.1f}M params (vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
        f"{cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} kv, mlp {cfg.mlp_dim}), fp32")
  print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  print(f"greedy, {new_tokens} new tokens, prompts 16-64 tokens left-padded; best of {repeats} interleaved runs "
        "after warm-up")
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the CPUs)")
  print(f"{'batch':>5} {'mlx_med tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}  tokens equal")
  for batch in batches:
    prompts = _prompts(batch, seed=batch)

    def ours():
      return sampler.generate(params, prompts, greedy)

    length = max(len(p) for p in prompts)
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, p in enumerate(prompts):
      ids[i, length - len(p):] = torch.tensor(p)
      mask[i, length - len(p):] = 1

    def theirs():
      with torch.no_grad():
        return hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    our_out = ours()  # warm-up (compiles)
    their_out = theirs()
    equal = sum(o.tokens == their_out[i, length:].tolist() for i, o in enumerate(our_out))
    # Interleaved repeats, best of each: on a shared machine the minimum is the least
    # disturbed run, and interleaving gives both sides the same chances of a quiet window.
    t_ours = t_theirs = float("inf")
    for _ in range(repeats):
      t_ours = min(t_ours, _time(ours, 1))
      t_theirs = min(t_theirs, _time(theirs, 1))
    generated = batch * new_tokens
    print(f"{batch:>5} {generated / t_ours:>14.1f} {generated / t_theirs:>19.1f} {t_theirs / t_ours:>6.2f}  "
          f"{equal}/{batch}", flush=True)
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_per_step(batch: int, reps: int = 12, steps: int = 10, threads: int | None = None) -> None:
  """Decode-step latency: ours with per-layer and with scanned layers, and torch; min/median.

  Less sensitive to other processes than whole `generate` runs (short, interleaved,
  minimum reported); it isolates the model step from generate's Python overhead.
  The scanned layout is the training layout; the per-layer one is what `LocalLM`
  and this benchmark's main mode use for generation (DecoderConfig.scan_layers).
  """
  import dataclasses

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from mlx_med.core import sampler as sampler_lib
  from mlx_med.core.transformer import unstack_layers
  from mlx_med.llm import checkpoint, hf_config

  _pin_torch_threads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    path = random_qwen2_checkpoint(tmp)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    scanned_cfg = hf_config.decoder_config_from_hf(hf_config.read_hf_config(path))
    scanned_params = checkpoint.load_hf_params(path, scanned_cfg)
  variants = {"per-layer": (dataclasses.replace(scanned_cfg, scan_layers=False),
                            unstack_layers(scanned_params, scanned_cfg.num_layers)),
              "scanned": (scanned_cfg, scanned_params)}
  prompts = [[5] * 40] * batch
  greedy = sampler_lib.SamplingParams(max_new_tokens=128, temperature=0.0)

  def ours(cfg, params) -> float:
    sampler = sampler_lib.Sampler(cfg, pad_id=0)
    tokens, rows, max_new, num_top, mode, *_ = sampler._prepare(prompts, [greedy] * batch)
    state = sampler_lib._prefill(params, tokens, rows, cfg=cfg, rules=None, max_new=max_new, num_top=num_top,
                                 mode=mode)
    state = sampler_lib._decode(params, state, rows, jnp.int32(2), cfg=cfg, rules=None, num_top=num_top, mode=mode)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state = sampler_lib._decode(params, state, rows, jnp.int32(2 + steps), cfg=cfg, rules=None, num_top=num_top,
                                mode=mode)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps

  def theirs() -> float:
    with torch.no_grad():
      out = hf_model(torch.full((batch, 40), 5), use_cache=True)
      cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      start = time.perf_counter()
      for _ in range(steps):
        out = hf_model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      return (time.perf_counter() - start) / steps

  timers = {f"mlx_med {name}": functools.partial(ours, *v) for name, v in variants.items()}
  timers["torch"] = theirs
  times = {name: [] for name in timers}
  for fn in timers.values():
    fn()  # compile / warm up
  for _ in range(reps):
    for name, fn in timers.items():
      times[name].append(fn())
  summary = "; ".join(f"{name} min {min(t) * 1e3:.1f} median {np.median(t) * 1e3:.1f}" for name, t in times.items())
  print(f"decode step at batch {batch} (prompt 40, greedy; ms): {summary}; load average {os.getloadavg()[0]:.2f}")


def run_gpu(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
  """Decode throughput of a ~1B Llama-style config with random weights (bf16)."""
  import jax

  from mlx_med.core import params as params_lib
  from mlx_med.core.sampler import Sampler, SamplingParams
  from mlx_med.core.transformer import DecoderConfig

  cfg = DecoderConfig(vocab_size=128256, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                      max_seq_len=4096, rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
                      param_dtype="bfloat16", scan_layers=False)
  params = params_lib.init_params(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  sampler = Sampler(cfg, pad_id=0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
  greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  prefill_only = SamplingParams(max_new_tokens=1, temperature=0.0)
  sampler.generate(params, prompts, greedy)  # compile
  sampler.generate(params, prompts, prefill_only)
  t_all = _time(lambda: sampler.generate(params, prompts, greedy), repeats)
  t_prefill = _time(lambda: sampler.generate(params, prompts, prefill_only), repeats)
  decode_tokens = batch * (new_tokens - 1)
  print(f"device: {jax.devices()[0].device_kind}; Llama-style {n_params / 1e9:.2f}B params, bf16, batch {batch}, "
        f"prompt {prompt_len}, {new_tokens} new tokens")
  print(f"end-to-end {batch * new_tokens / t_all:.0f} tok/s; decode {decode_tokens / max(t_all - t_prefill, 1e-9):.0f} "
        f"tok/s (prefill+first token {t_prefill * 1e3:.1f} ms)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="decode tokens/s of a ~1B config on the accelerator")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores XLA uses)")
  parser.add_argument("--per-step", type=int, default=None, metavar="BATCH",
                      help="instead: decode-step latency at this batch, ours vs torch (min/median of 12)")
  args = parser.parse_args(argv)
  if args.per_step:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run_per_step(args.per_step, threads=args.threads)
  elif args.gpu:
    run_gpu(batch=32, prompt_len=128, new_tokens=args.new_tokens, repeats=args.repeats)
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run_cpu([int(b) for b in args.batches.split(",")], args.new_tokens, args.repeats, args.threads)
  return 0


if __name__ == "__main__":
  sys.exit(main())
