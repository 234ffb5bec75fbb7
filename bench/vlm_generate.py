"""Image + text greedy generation throughput: mlx_med's LLaVA vs transformers' (torch, CPU).

Both run the same random LLaVA checkpoint, written by transformers: a CLIP ViT 224/14
(width 256, 4 blocks, 4 heads, MLP 1024; features from block 3, class token dropped:
256 visual tokens per image), the two-layer GELU projector, and a Llama decoder (vocab
32000, d_model 512, 4 layers, 8 heads / 2 KV heads, MLP 1536), fp32. Each prompt is one
image and 8-24 text tokens around it; greedy, exactly 64 new tokens (no EOS), at batch
1 and 8. Timed end to end: the image encoding and prefill are part of each run.

Ours: `llava.prompt_inputs` per prompt (jitted vision tower + projector + splice), then
`Sampler.generate` with `prompt_embeds` on per-layer decoder parameters (scan off, as
LocalLM / LocalVLM run inference). Theirs: `LlavaForConditionalGeneration.generate` on
the left-padded batch (eager), and, with --compile, the same after `torch.compile` of
the model's forward (reported as failed if this torch cannot compile on this CPU).
Each side is warmed up once per batch size, then the best of --repeats interleaved runs
counts; tokens/s counts generated tokens only. torch gets as many threads as XLA uses.

  python bench/vlm_generate.py                 # batch 1 and 8, eager torch
  python bench/vlm_generate.py --compile       # also torch.compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

IMAGE_TOKEN = 31999
VOCAB = 32000


def random_llava_checkpoint(directory: str, seed: int = 0) -> str:
  """The benchmark model (random weights, fp32) written by transformers into `directory`."""
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  vision = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 224,
                "patch_size": 14, "hidden_act": "quick_gelu"}
  text = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024, "bos_token_id": 1,
              "eos_token_id": None, "pad_token_id": 0, "tie_word_embeddings": False}
  cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 1.0 if name.endswith(("norm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")) else 0.0
      p.copy_(scale + 0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  return directory


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _prompts(batch: int, seed: int, image_tokens: int) -> tuple[list[list[int]], np.ndarray]:
  """Expanded prompts (text, image tokens, text) and their images [batch, 224, 224, 3]."""
  rng = np.random.default_rng(seed)
  prompts = []
  for _ in range(batch):
    before, after = int(rng.integers(4, 13)), int(rng.integers(4, 13))
    prompts.append([1] + rng.integers(2, IMAGE_TOKEN, before).tolist() + [IMAGE_TOKEN] * image_tokens
                   + rng.integers(2, IMAGE_TOKEN, after).tolist())
  return prompts, rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)


def run(batches: list[int], new_tokens: int, repeats: int, compile_torch: bool) -> None:
  import dataclasses

  import jax
  import torch
  import transformers

  from mlx_med.core.sampler import Sampler, SamplingParams
  from mlx_med.core.transformer import unstack_layers
  from mlx_med.vlm import llava

  torch.set_num_threads(_cores())
  with tempfile.TemporaryDirectory() as tmp:
    path = random_llava_checkpoint(tmp)
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    cfg, params = llava.load_hf(path)
  # Inference layout: one parameter tree and KV cache per decoder layer (see DecoderConfig.scan_layers).
  params = {**params, "language_model": unstack_layers(params["language_model"], cfg.decoder.num_layers)}
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=False))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  sampler = Sampler(cfg.decoder, pad_id=0)
  greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  print(f"model: LLaVA, {n_params / 1e6:.1f}M params: CLIP ViT {cfg.vision.image_size}/{cfg.vision.patch_size} width "
        f"{cfg.vision.width}, {cfg.vision.depth} blocks (features from block {cfg.vision_depth_used}, "
        f"{cfg.num_image_tokens} tokens/image); Llama decoder vocab {cfg.decoder.vocab_size}, d_model "
        f"{cfg.decoder.d_model}, {cfg.decoder.num_layers} layers, {cfg.decoder.num_heads} heads / "
        f"{cfg.decoder.num_kv_heads} kv, mlp {cfg.decoder.mlp_dim}; fp32")
  print(f"machine: {os.cpu_count()} CPUs ({_cores()} usable), jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  print(f"greedy, {new_tokens} new tokens, one image + 8-24 text tokens per prompt, end to end (vision + prefill + "
        f"decode); best of {repeats} interleaved runs after warm-up")
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the CPUs)")

  # torch.compile of the model's forward (dynamic shapes: the prompt and each decode step differ);
  # compilation happens on the first call, timed separately and excluded like our compiles.
  compiled = torch.compile(hf_model.forward, dynamic=True) if compile_torch else None
  original = hf_model.forward

  header = f"{'batch':>5} {'mlx_med tok/s':>14} {'torch eager tok/s':>18} {'ratio':>6}"
  if compiled is not None:
    header += f" {'torch.compile tok/s':>20} {'ratio':>6}"
  print(header + "  tokens equal")
  for batch in batches:
    prompts, images = _prompts(batch, seed=batch, image_tokens=cfg.num_image_tokens)

    def ours(prompts=prompts, images=images):
      embeds, positions = zip(*[llava.prompt_inputs(cfg, params, p, [images[i]]) for i, p in enumerate(prompts)])
      return sampler.generate(params["language_model"], prompts, greedy, prompt_embeds=list(embeds),
                              prompt_positions=list(positions))

    length = max(len(p) for p in prompts)
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, p in enumerate(prompts):
      ids[i, length - len(p):] = torch.tensor(p)
      mask[i, length - len(p):] = 1
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    def theirs(ids=ids, mask=mask, pixels=pixels):
      with torch.no_grad():
        return hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    our_out = ours()  # warm-up (compiles)
    their_out = theirs()
    equal = sum(o.tokens == their_out[i, length:].tolist() for i, o in enumerate(our_out))
    t_ours = t_theirs = t_compiled = float("inf")
    compiled_note = ""
    if compiled is not None:
      try:
        hf_model.forward = compiled
        start = time.perf_counter()
        theirs()  # compile
        compiled_note = f" (first compiled run {time.perf_counter() - start:.0f} s)"
      except Exception as e:  # noqa: BLE001
        print(f"torch.compile: failed on this CPU torch ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        compiled = None
      finally:
        hf_model.forward = original
    for _ in range(repeats):
      start = time.perf_counter()
      ours()
      t_ours = min(t_ours, time.perf_counter() - start)
      start = time.perf_counter()
      theirs()
      t_theirs = min(t_theirs, time.perf_counter() - start)
      if compiled is not None:
        hf_model.forward = compiled
        start = time.perf_counter()
        theirs()
        t_compiled = min(t_compiled, time.perf_counter() - start)
        hf_model.forward = original
    generated = batch * new_tokens
    line = f"{batch:>5} {generated / t_ours:>14.1f} {generated / t_theirs:>18.1f} {t_theirs / t_ours:>6.2f}"
    if compiled is not None:
      line += f" {generated / t_compiled:>20.1f} {t_compiled / t_ours:>6.2f}"
    print(line + f"  {equal}/{batch}{compiled_note}", flush=True)
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="also time torch.compile'd transformers")
  args = parser.parse_args(argv)
  run([int(b) for b in args.batches.split(",")], args.new_tokens, args.repeats, args.compile)


if __name__ == "__main__":
  main()
