"""Qwen2.5-VL-class step: vision tower, multimodal prefill and greedy decoding of a random Qwen2.5-VL.

What is timed (random weights from `mlx_med.vlm.qwen2_5_vl.init_params`; nothing is downloaded):
  vision     the vision tower on one image of --image-px square (patches -> merged tokens): patch
             embedding, --size's blocks of windowed / full attention, the patch merger;
  prefill    the whole model's forward on one prompt (text + that image): vision tower, splice, decoder
             logits over every position;
  generate   `prompt_inputs` + the core sampler (`Sampler.generate`, greedy) producing --new-tokens
             tokens after the prompt; reported as new tokens per second (prefill included).
Each is compiled once (excluded), then run --reps times; figures are medians.

--peer transformers times the same random model (written with `save_hf`, loaded by transformers'
Qwen2_5_VLForConditionalGeneration, eager fp32 on CPU) on the same inputs, and prints ours/peer
ratios (< 1 = we are faster). It also checks that both pick the same greedy tokens.

Sizes: `tiny` (seconds on a CPU; the test config's scale), `mid` (a scaled-down Qwen2.5-VL: vision
8 blocks x 640 wide with 2 full-attention blocks, decoder 8 layers x 1024, ~0.2 B parameters; meant
for a GPU), `3b` (Qwen2.5-VL-3B's shapes, 32 vision blocks x 1280 and 36 decoder layers x 2048; bf16
on a GPU).

Commands:
  python bench/qwen2_5_vl_step.py --size tiny --peer transformers           # CPU figure
  python bench/qwen2_5_vl_step.py --size mid --dtype bfloat16 --image-px 448 --new-tokens 64   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.core.transformer import DecoderConfig
from mlx_med.vlm import qwen2_5_vl as qv

IMAGE, VSTART, VEND = 151, 152, 153  # token ids inside every size's vocabulary


def make_config(size: str, dtype: str = "float32", max_seq_len: int = 4096) -> qv.Qwen25VLConfig:
  """A Qwen2.5-VL config of one benchmark size (random weights; the shapes only)."""
  if size == "tiny":
    vision = qv.Qwen25VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                                   patch_size=14, window_size=56, fullatt_block_indexes=(1, 3))
    decoder = DecoderConfig(vocab_size=512, num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=256,
                            qkv_bias=True, mrope_section=(4, 6, 6))
  elif size == "mid":
    vision = qv.Qwen25VisionConfig(depth=8, hidden_size=640, intermediate_size=1710, num_heads=10,
                                   out_hidden_size=1024, fullatt_block_indexes=(3, 7))
    decoder = DecoderConfig(vocab_size=32768, num_layers=8, d_model=1024, num_heads=16, num_kv_heads=4,
                            mlp_dim=2816, qkv_bias=True, mrope_section=(8, 12, 12), rope_theta=1e6)
  elif size == "3b":
    vision = qv.Qwen25VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=2048)
    decoder = DecoderConfig(vocab_size=151936, num_layers=36, d_model=2048, num_heads=16, num_kv_heads=2,
                            mlp_dim=11008, qkv_bias=True, mrope_section=(16, 24, 24), rope_theta=1e6,
                            tie_embeddings=True)
  else:
    raise ValueError(f"--size {size!r}: choose tiny, mid or 3b")
  decoder = dataclasses.replace(decoder, dtype=dtype, param_dtype="float32", max_seq_len=max_seq_len,
                                norm_eps=1e-6, scan_layers=False)
  return qv.Qwen25VLConfig(decoder=decoder, vision=vision, image_token_id=IMAGE, vision_start_token_id=VSTART,
                           vision_end_token_id=VEND)


def make_inputs(cfg: qv.Qwen25VLConfig, image_px: int, text_tokens: int, seed: int = 0):
  """One image of image_px square as processor-shaped patches, and an expanded prompt around it."""
  v = cfg.vision
  side = max(v.spatial_merge_size, round(image_px / v.patch_size / v.spatial_merge_size) * v.spatial_merge_size)
  grid = (1, side, side)
  rng = np.random.default_rng(seed)
  patches = rng.normal(size=(side * side, v.patch_dim)).astype(np.float32)
  text = rng.integers(0, IMAGE - 1, size=text_tokens).tolist()
  ids = text[:text_tokens // 2] + [VSTART, IMAGE, VEND] + text[text_tokens // 2:]
  return qv.expand_image_tokens(ids, [(patches, grid)], cfg), (patches, grid)


def _median_time(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile / warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_step(size: str = "tiny", *, dtype: str = "float32", image_px: int = 224, text_tokens: int = 32,
               new_tokens: int = 16, reps: int = 3, peer: str | None = None, seed: int = 0) -> dict:
  """Times vision / prefill / generate for one random model; returns the figures (seconds, tokens/s)."""
  cfg = make_config(size, dtype)
  params = qv.init_params(cfg, jax.random.PRNGKey(seed))
  ids, image = make_inputs(cfg, image_px, text_tokens, seed)
  patches, grid = jnp.asarray(image[0]), (image[1],)
  model = qv.Qwen25VL(cfg)
  vision = jax.jit(lambda p, x: model.apply({"params": p}, (x, grid), method=qv.Qwen25VL.image_features))
  positions = jnp.asarray(qv.get_rope_index(ids, grid, cfg)[None])
  tokens = jnp.asarray([ids], jnp.int32)
  prefill = jax.jit(lambda p, t, x, pos: model.apply({"params": p}, t, (x, grid), positions=pos))
  sampler = Sampler(cfg.decoder)
  sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  generated: list[int] = []

  def generate():
    emb, pos = qv.prompt_inputs(cfg, params, ids, [image])
    out = sampler.generate(params["language_model"], [ids], sampling, prompt_embeds=[emb], prompt_positions=[pos])
    generated[:] = list(out[0].tokens)
    return jnp.zeros(())

  result = {
      "size": size, "dtype": dtype, "backend": jax.default_backend(), "image_grid": list(image[1]),
      "image_patches": int(patches.shape[0]), "image_tokens": int(patches.shape[0]) // cfg.vision.merge_unit,
      "prompt_tokens": len(ids), "new_tokens": new_tokens,
      "vision_s": _median_time(lambda: vision(params, patches), reps),
      "prefill_s": _median_time(lambda: prefill(params, tokens, patches, positions), reps),
  }
  gen_s = _median_time(generate, reps)
  result["generate_s"] = gen_s
  result["generate_tokens_per_s"] = new_tokens / gen_s
  if peer == "transformers":
    result.update(_peer_transformers(cfg, params, ids, image, new_tokens, reps, generated))
  return result


def _peer_transformers(cfg, params, ids, image, new_tokens, reps, ours_tokens) -> dict:
  import torch

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  from torch_peers import (
    import_torchvision,  # tests/ helper: torchvision without its CUDA import
  )

  import_torchvision()
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    qv.save_hf(os.path.join(tmp, "m"), cfg, params)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(tmp, "m"), attn_implementation="eager").eval()
  input_ids = torch.tensor([ids])
  inputs = {"input_ids": input_ids, "pixel_values": torch.tensor(image[0]),
            "image_grid_thw": torch.tensor([image[1]]), "mm_token_type_ids": (input_ids == IMAGE).to(torch.int32),
            "attention_mask": torch.ones_like(input_ids)}

  def timed(fn):
    with torch.no_grad():
      fn()
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out

  vis_s, _ = timed(lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
  pre_s, _ = timed(lambda: model(**inputs).logits)
  gen_s, out = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                            eos_token_id=None, pad_token_id=0))
  theirs = out[0, len(ids):].tolist()
  return {"peer": "transformers (eager, torch CPU)", "peer_vision_s": vis_s, "peer_prefill_s": pre_s,
          "peer_generate_s": gen_s, "same_greedy_tokens": theirs == ours_tokens}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=("tiny", "mid", "3b"))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--image-px", type=int, default=224)
  ap.add_argument("--text-tokens", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--peer", choices=("transformers",), default=None)
  ap.add_argument("--json", default=None, help="also write the figures to this file")
  args = ap.parse_args(argv)
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a loaded machine flatters XLA)")
  r = bench_step(args.size, dtype=args.dtype, image_px=args.image_px, text_tokens=args.text_tokens,
                 new_tokens=args.new_tokens, reps=args.reps, peer=args.peer)
  print(f"Qwen2.5-VL step, size {r['size']} {r['dtype']} on {r['backend']}: image grid {r['image_grid']} "
        f"({r['image_patches']} patches -> {r['image_tokens']} tokens), prompt {r['prompt_tokens']} tokens")
  print(f"  vision tower  {r['vision_s'] * 1e3:9.1f} ms")
  print(f"  prefill       {r['prefill_s'] * 1e3:9.1f} ms")
  print(f"  generate      {r['generate_s'] * 1e3:9.1f} ms for {r['new_tokens']} tokens "
        f"({r['generate_tokens_per_s']:.1f} tokens/s, prefill included)")
  if "peer" in r:
    print(f"  peer {r['peer']}: vision {r['peer_vision_s'] * 1e3:.1f} ms, prefill {r['peer_prefill_s'] * 1e3:.1f} ms, "
          f"generate {r['peer_generate_s'] * 1e3:.1f} ms")
    print(f"  ratio ours/peer: vision {r['vision_s'] / r['peer_vision_s']:.2f}, prefill "
          f"{r['prefill_s'] / r['peer_prefill_s']:.2f}, generate {r['generate_s'] / r['peer_generate_s']:.2f}; "
          f"same greedy tokens: {r['same_greedy_tokens']}")
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
