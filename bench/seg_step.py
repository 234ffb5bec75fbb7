"""BoltzFormer decoder step: the sampled cross-attention through our kernel vs the release's dense computation.

What is timed: the masked cross-attention of the 9 decoder layers at the paper's shapes (101 object queries,
hidden 512 = 8 heads x 64, layer i attending to pixel-decoder level i % 3 of a 512 px image: 16x16, 32x32,
64x64 keys), forward + backward (the gradients with respect to q, k and v of every layer), under the SAME keep
masks for both methods:
  dense_sampled  `mlx_med.seg.sampling.dense_masked_attention`: the full [queries, keys] score matrix with
                 -inf where a key is not kept -- what the public BoltzFormer release computes;
  boltzmann      `mlx_med.seg.sampling.attend(mode="boltzmann", kernel_backend=...)`: the Pallas block-sparse
                 kernel on GPU/TPU (building its block layout from the mask is inside the timed step, as in
                 the model), its XLA fallback on CPU (which, for a per-key mask, is the dense formulation:
                 expect a ratio near 1 on CPU).
Projections, self-attention and FFN are the same code in both modes and are not timed here; --full-model
times the whole model's training step (`mlx_med.seg.model`) under both modes.

The keep masks follow the release's rules (`mlx_med.seg.sampling.keep_mask`, mode "boltzmann", samples
independent per head) on realistic score maps: per query a sigmoid mask map, a blob for the queries that
predict an object (radius log-uniform from 3 to 60 px of the 512 px image, i.e. objects from below 0.1% to
over 1% of the image) and a low, smooth map for the others; layer i samples with the temperature of the
prediction before it (layer_id i - 1: T = 1, 1/2, ..., 1/9), or one fixed --layer-id for every layer.

Also reported, per level: the kept fraction of (head, query, key) triples and the fraction of (query tile x
key block) pairs the kernel visits (`BlockSparseLayout.visited_fraction`) with the keys in raster order and in
patch-major order (`pallas_kernels.boltzmann_sampling.patch_major_permutation`, patch^2 = block_k), and with
one query per tile (the floor any query tiling could reach). Per-key samples at 10% touch nearly every block
whatever the order (measured: 1.000 at 64x64 tiles in both orders, 0.998 per query): rows of queries that
predict nothing have a near-uniform Boltzmann distribution, keeping ~10% of keys everywhere, and one query
misses a 64-key block with probability about 0.9^64 = 0.001. So the
kernel cannot skip work under the release's per-key semantics; --block-sampled times it on whole-block samples
(`sample_kept_blocks`, a different sampling rule, labelled so) to show what skipping tiles buys.

Timing: one warm-up call per method (compile excluded), then --reps calls interleaved round robin (alternating
order) so background load hits both alike; the figure is the median, the ratio the median of the per-rep
paired ratios dense / boltzmann. With --check the outputs and gradients of the two methods are compared first
(tolerances relative to max(1, max|reference|): fp32 2e-5 / 1e-4, bf16 3e-2 / 8e-2, the kernel tests'), and
on a GPU with --backend pallas the lowered step must contain the Triton kernel call; a failure exits 1.

Commands:
  python bench/seg_step.py --batch 1 --reps 5                               # CPU figure (XLA path)
  python bench/seg_step.py --backend pallas --check --time-patch-major --block-sampled   # GPU (gpu_suite.sh)
  python bench/seg_step.py --full-model                                     # + the whole model step
  python bench/seg_step.py --smoke                                          # tiny shapes, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sparse_attention
from pallas_kernels import boltzmann_sampling as bs
from pallas_kernels import common
from pallas_kernels.common import BlockSizes

TOLERANCES = {"float32": {"fwd": 2e-5, "grad": 1e-4}, "bfloat16": {"fwd": 3e-2, "grad": 8e-2}}
_KERNEL_CALLS = {"gpu": ("__gpu$xla.gpu.triton", "triton_kernel_call"), "tpu": ("tpu_custom_call",)}


def _sampling():
  """The sampling module (imported late: a clear message if it is missing)."""
  try:
    from mlx_med.seg import sampling
  except ImportError as e:  # pragma: no cover - only before mlx_med.seg.sampling lands
    raise SystemExit(f"seg_step: cannot import mlx_med.seg.sampling ({e}); it provides keep_mask/attend.")
  return sampling


# ------------------------------------------------------------------ inputs
def level_shapes(image_size: int, num_levels: int = 3) -> list[tuple[int, int]]:
  """The decoder's key grids, lowest resolution first: 1/32, 1/16, 1/8 of the image."""
  out = []
  for i in range(num_levels):
    stride = 32 // (2 ** i)
    if image_size % stride:
      raise ValueError(f"--image-size {image_size} must be a multiple of {stride} (level {i} is 1/{stride}).")
    out.append((image_size // stride, image_size // stride))
  return out


def blob_score_maps(batch: int, queries: int, image_size: int, grids, *, object_fraction: float,
                    seed: int = 0) -> list[np.ndarray]:
  """Sigmoid mask probabilities [B, Q, h*w] per level, consistent across levels (one object per query).

  A share `object_fraction` of the queries predicts a round object (logit 6 at the centre, 0 on the rim,
  falling outside); the others predict nothing (logit about -5 with a smooth ripple), as most of Mask2Former's
  queries do after training.
  """
  rng = np.random.default_rng(seed)
  cy = rng.uniform(0, image_size, (batch, queries, 1))
  cx = rng.uniform(0, image_size, (batch, queries, 1))
  radius = np.exp(rng.uniform(math.log(3.0), math.log(60.0), (batch, queries, 1))) * image_size / 512
  has_object = rng.random((batch, queries, 1)) < object_fraction
  phase = rng.uniform(0, 2 * math.pi, (batch, queries, 2))
  maps = []
  for h, w in grids:
    # Key centres in image pixels (the bilinear resize of a 1/4-res map samples the same places).
    yy = ((np.arange(h) + 0.5) * image_size / h)[:, None].repeat(w, 1).reshape(1, 1, -1)
    xx = ((np.arange(w) + 0.5) * image_size / w)[None, :].repeat(h, 0).reshape(1, 1, -1)
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    blob = 6.0 * (1.0 - d2 / radius ** 2)
    blob = np.maximum(blob, -8.0)
    ripple = -5.0 + 0.8 * np.sin(yy / image_size * 6.3 + phase[..., :1]) * np.cos(
        xx / image_size * 6.3 + phase[..., 1:])
    logits = np.where(has_object, blob, ripple)
    maps.append((1.0 / (1.0 + np.exp(-logits))).astype(np.float32))
  return maps


def randn(seed: int, shape, dtype) -> jax.Array:
  # numpy draws: no PRNG program to compile for each shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)).astype(dtype)


# ------------------------------------------------------------------ steps
def make_step(attn):
  """fwd + bwd of the decoder's cross-attentions: (per-layer outputs, (dq, dk, dv) per layer)."""

  def step(qs, ks, vs, keeps, cts):
    def fwd(qs, ks, vs):
      return [attn(q, k, v, keep) for q, k, v, keep in zip(qs, ks, vs, keeps)]

    outs, vjp = jax.vjp(fwd, qs, ks, vs)
    return outs, vjp(cts)

  return jax.jit(step)


def compiled(step, args):
  c = step.lower(*args).compile()
  jax.block_until_ready(c(*args))  # warm-up (first run), excluded from the timings
  return c


def time_interleaved(calls: dict, args: dict, reps: int) -> dict[str, list[float]]:
  times = {name: [] for name in calls}
  names = list(calls)
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(calls[name](*args[name]))
      times[name].append(time.perf_counter() - t0)
  return times


def max_rel_error(actual, expected) -> float:
  a = np.asarray(actual, np.float32)
  e = np.asarray(expected, np.float32)
  if not np.all(np.isfinite(a)):
    return math.inf
  return float(np.max(np.abs(a - e))) / max(1.0, float(np.max(np.abs(e))))


# ------------------------------------------------------------------ full model
def full_model_rows(args, backend: str) -> tuple[list[str], dict | None]:
  """The whole BoltzFormer training step (forward + backward of Dice + BCE over every parameter) under
  mode boltzmann (our kernel) and mode dense_sampled (the release's dense computation), same samples.

  The model comes from configs/seg/boltzformer.py (--full-model-variant: paper = 512 px, DaViT + 6-layer
  transformer FPN + 12-layer text tower, bf16; smoke = 128 px, tiny towers), random parameters and inputs.
  """
  try:
    from configs.seg import boltzformer as seg_config
    from mlx_med.seg import model as seg_model
  except ImportError as e:
    return [f"# --full-model: the BoltzFormer model or its config is not importable ({e}); skipped"], None
  variant = args.full_model_variant
  config = seg_config.get_config(variant)
  values = config.model.to_dict()
  values.pop("encoder_init_from", None)
  vocab = int(config.data.get("tokenizer_vocab_size", 512))
  text = dict(values["text"])
  text["vocab_size"] = int(text.get("vocab_size", 0)) if int(text.get("vocab_size", 0)) > 0 else vocab
  text["pad_token_id"] = 0 if int(text.get("pad_token_id", -1)) < 0 else int(text["pad_token_id"])
  text["eos_token_id"] = 1 if int(text.get("eos_token_id", -1)) < 0 else int(text["eos_token_id"])
  values["text"] = text
  values["encoder"] = dict(values["encoder"], image_size=int(values["image_size"]))
  values["kernel_backend"] = backend
  cfg = seg_model.BoltzFormerConfig.from_dict(values)
  import flax.linen as nn

  params = nn.meta.unbox(seg_model.init_params(cfg, jax.random.PRNGKey(args.seed)))
  b, size, length = args.full_model_batch, cfg.image_size, 8
  rng = np.random.default_rng(args.seed)
  images = jnp.asarray(rng.standard_normal((b, size, size, 3), dtype=np.float32))
  ids = np.concatenate([rng.integers(2, text["vocab_size"], (b, length - 1)), np.ones((b, 1))], 1)
  ids = jnp.asarray(ids, jnp.int32)
  yy, xx = np.mgrid[:size, :size]
  masks = jnp.asarray(np.stack([((yy - size * 0.4) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.05) ** 2)] * b),
                      jnp.uint8)

  def make(mode):
    model = seg_model.BoltzFormer(cfg.with_attention(mode))

    def step(params, images, ids, masks, key):
      def loss(p):
        out = model.apply({"params": p}, images, ids, sample_rng=key, train=True)
        return jnp.sum(seg_model.seg_loss(out.logits, masks)[0])

      return jax.value_and_grad(loss)(params)

    return jax.jit(step)

  key = jax.random.PRNGKey(args.seed + 1)
  step_args = (params, images, ids, masks, key)
  t0 = time.time()
  calls = {mode: compiled(make(mode), step_args) for mode in ("dense_sampled", "boltzmann")}
  compile_s = time.time() - t0
  loss_d = float(calls["dense_sampled"](*step_args)[0])
  loss_b = float(calls["boltzmann"](*step_args)[0])
  times = time_interleaved(calls, {m: step_args for m in calls}, args.reps)
  med = {m: 1e3 * statistics.median(t) for m, t in times.items()}
  ratio = statistics.median(a / c for a, c in zip(times["dense_sampled"], times["boltzmann"]))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  lines = [(f"# full model ({variant}: {size} px, {n_params / 1e6:.1f}M parameters, {cfg.dtype}, batch {b}),"
            f" forward + backward of Dice + BCE; compiled in {compile_s:.1f}s;"
            f" loss dense_sampled {loss_d:.6f} vs boltzmann {loss_b:.6f} (same samples)")]
  for m in calls:
    lines.append(f"  full model {m:<14} {med[m]:10.2f} ms  (median of {args.reps})")
  lines.append(f"ratio full model dense_sampled / boltzmann: {ratio:.2f}x (median of paired per-rep ratios)")
  return lines, {"variant": variant, "batch": b, "params": n_params, "median_ms": med, "ratio": ratio,
                 "loss": {"dense_sampled": loss_d, "boltzmann": loss_b}, "compile_s": compile_s}


# ------------------------------------------------------------------ main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--backend", default="auto", choices=sparse_attention.BACKENDS,
                 help="Boltzmann backend for mode boltzmann (auto: pallas on GPU/TPU, xla on CPU)")
  p.add_argument("--batch", type=int, default=None, help="images per step (default 8 on GPU/TPU, 1 on CPU)")
  p.add_argument("--reps", type=int, default=None, help="timed reps per method (default 10 accel, 5 CPU)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="q/k/v dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--image-size", type=int, default=512)
  p.add_argument("--queries", type=int, default=101)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--layers", type=int, default=9)
  p.add_argument("--sample-ratio", type=float, default=0.1)
  p.add_argument("--base-temp", type=float, default=1.0)
  p.add_argument("--layer-id", type=int, default=None,
                 help="sample every layer at this layer_id's temperature (default: the schedule, i - 1)")
  p.add_argument("--object-fraction", type=float, default=0.3, help="share of queries predicting an object")
  p.add_argument("--check", action="store_true", help="compare outputs/grads first; exit 1 on a mismatch")
  p.add_argument("--time-patch-major", action="store_true",
                 help="also time boltzmann with keys (and k, v, mask) in patch-major order")
  p.add_argument("--block-sampled", action="store_true",
                 help="also time the kernel on block-granularity samples (sample_kept_blocks; different "
                 "semantics from the release's, labelled so): what skipping tiles buys")
  p.add_argument("--full-model", action="store_true", help="also time the whole model step (mlx_med.seg.model)")
  p.add_argument("--full-model-variant", default=None, choices=("paper", "smoke"),
                 help="configs/seg/boltzformer.py variant for --full-model (default: paper on GPU/TPU, else smoke)")
  p.add_argument("--full-model-batch", type=int, default=None, help="images per full-model step (default 2 / 1)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes and 2 reps (seconds; for tests)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the figures to this JSON file")
  args = p.parse_args(argv)
  on_accel = jax.default_backend() in ("gpu", "tpu")
  if args.smoke:
    args.image_size, args.queries, args.hidden, args.heads, args.layers = 64, 11, 32, 2, 3
    args.batch = args.batch or 1
    args.reps = args.reps or 2
  args.batch = args.batch or (8 if on_accel else 1)
  args.reps = args.reps or (10 if on_accel else 5)
  args.full_model_variant = args.full_model_variant or ("paper" if on_accel and not args.smoke else "smoke")
  args.full_model_batch = args.full_model_batch or (2 if on_accel else 1)
  if args.dtype == "auto":
    args.dtype = "bfloat16" if on_accel else "float32"
  if args.hidden % args.heads:
    p.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  sampling = _sampling()
  t_start = time.time()
  backend = sparse_attention.resolve_backend(args.backend)
  dtype = jnp.dtype(args.dtype)
  head_dim = args.hidden // args.heads
  b, h, nq = args.batch, args.heads, args.queries
  grids = level_shapes(args.image_size)
  lowering = common.default_lowering()
  bsz = BlockSizes.get_default(lowering)
  dev = jax.devices()[0]
  load = os.getloadavg()
  print(f"# machine: {dev.platform} {getattr(dev, 'device_kind', '')} ({platform.machine()},"
        f" {os.cpu_count()} CPU cores), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f},"
        f" jax {jax.__version__}")
  print(f"# shapes: batch {b}, {nq} queries, hidden {args.hidden} ({h} heads x {head_dim}), {args.layers}"
        f" layers over levels {'/'.join(f'{y}x{x}' for y, x in grids)} of a {args.image_size} px image;"
        f" sample_ratio {args.sample_ratio}, {args.dtype}; boltzmann backend {backend}"
        f" (kernel tiles {bsz.block_q}x{bsz.block_k}, {lowering} lowering)")

  # Keep masks with the release's rules, one per layer, on the level that layer reads.
  maps = blob_score_maps(b, nq, args.image_size, grids, object_fraction=args.object_fraction, seed=args.seed)
  keeps, temps, levels = [], [], []
  root = jax.random.PRNGKey(args.seed)
  for i in range(args.layers):
    level = i % len(grids)
    layer_id = (i - 1) if args.layer_id is None else args.layer_id
    keep = sampling.keep_mask(jax.random.fold_in(root, i), jnp.asarray(maps[level]), mode="boltzmann",
                              layer_id=layer_id, num_heads=h, sample_ratio=args.sample_ratio,
                              base_temp=args.base_temp)
    keeps.append(jax.block_until_ready(keep))
    temps.append(sampling.layer_temperature(layer_id, args.base_temp))
    levels.append(level)

  # Kept fraction and the kernel's visited tiles, raster vs patch-major key order.
  patch = math.isqrt(bsz.block_k)
  perms = {}
  for li, (gh, gw) in enumerate(grids):
    if patch * patch == bsz.block_k and gh % patch == 0 and gw % patch == 0:
      perms[li] = bs.patch_major_permutation(gh, gw, patch)
  layer_rows = []
  print(f"# visited = share of ({bsz.block_q} queries x {bsz.block_k} keys) kernel tiles with a kept key;"
        f" per-query = share of (1 query x {bsz.block_k} keys) pairs, what any query tiling could reach at best")
  print(f"# layer level keys      T     kept  visited(raster)  visited(patch-major {patch}x{patch})"
        "  per-query(raster)")
  for i, (keep, level, t) in enumerate(zip(keeps, levels, temps)):
    kept = float(jnp.mean(keep))
    vis = float(bs.block_sparse_layout_from_mask(keep, block_q=bsz.block_q, block_k=bsz.block_k)
                .visited_fraction())
    vis_pm = None
    if level in perms:
      vis_pm = float(bs.block_sparse_layout_from_mask(keep[..., perms[level]], block_q=bsz.block_q,
                                                      block_k=bsz.block_k).visited_fraction())
    vis_q = float(bs.block_sparse_layout_from_mask(keep, block_q=1, block_k=bsz.block_k).visited_fraction())
    n = keep.shape[-1]
    layer_rows.append({"layer": i, "level": level, "keys": n, "temperature": t, "kept_fraction": kept,
                       "visited_raster": vis, "visited_patch_major": vis_pm, "visited_per_query": vis_q})
    pm = "-" if vis_pm is None else f"{vis_pm:.3f}"
    print(f"  {i:5d} {level:5d} {n:5d} {t:6.3f} {kept:7.3f}  {vis:15.3f}  {pm:>15}  {vis_q:17.3f}")
  kept_total = sum(float(jnp.sum(k)) for k in keeps)
  full_total = sum(float(k.size) for k in keeps)
  kept_fraction = kept_total / full_total
  print(f"# kept fraction over all layers: {kept_fraction:.4f} of the (head, query, key) triples"
        f" ({1 / kept_fraction:.1f}x fewer attention FLOPs than full, counted from the kept keys)")

  # Inputs and cotangents per layer.
  qs = [randn(100 + i, (b, h, nq, head_dim), dtype) for i in range(args.layers)]
  ks = [randn(200 + i, (b, h, k.shape[-1], head_dim), dtype) for i, k in enumerate(keeps)]
  vs = [randn(300 + i, (b, h, k.shape[-1], head_dim), dtype) for i, k in enumerate(keeps)]
  cts = [randn(400 + i, (b, h, nq, head_dim), dtype) for i in range(args.layers)]
  dense_attn = lambda q, k, v, keep: sampling.dense_masked_attention(q, k, v, keep)
  boltz_attn = lambda q, k, v, keep: sampling.attend(q, k, v, keep, mode="boltzmann", kernel_backend=backend)
  step_args = {"dense_sampled": (qs, ks, vs, keeps, cts), "boltzmann": (qs, ks, vs, keeps, cts)}
  steps = {"dense_sampled": make_step(dense_attn), "boltzmann": make_step(boltz_attn)}
  if args.time_patch_major and perms:
    pm = lambda xs, axis_from_end: [
        jnp.take(x, perms[lv], axis=x.ndim - axis_from_end) if lv in perms else x for x, lv in zip(xs, levels)]
    step_args["boltzmann[patch-major]"] = (qs, pm(ks, 2), pm(vs, 2), pm(keeps, 1), cts)
    steps["boltzmann[patch-major]"] = steps["boltzmann"]
  block_rows = []
  if args.block_sampled:
    # NOT the release's semantics: whole key blocks drawn per (query tile, head) from the tile's Boltzmann
    # block mass (pallas_kernels.boltzmann_sampling.sample_kept_blocks), keys in patch-major order where the
    # level allows. What the kernel gains when its tiles can actually be skipped.
    bkeeps = []
    for i, (level, t) in enumerate(zip(levels, temps)):
      sc = jnp.asarray(maps[level])
      if level in perms:
        sc = sc[..., perms[level]]
      sc = jnp.broadcast_to(sc[:, None], (b, h) + sc.shape[1:])
      lay = bs.sample_kept_blocks(jax.random.fold_in(root, 1000 + i), sc, temperature=t,
                                  sample_ratio=args.sample_ratio, block_q=bsz.block_q, block_k=bsz.block_k)
      bkeeps.append(jax.block_until_ready(lay.to_dense_mask()))
      block_rows.append({"layer": i, "kept_fraction": float(jnp.mean(bkeeps[-1])),
                         "visited": float(lay.visited_fraction())})
    print("# block-sampled (NOT the release's per-key semantics; whole key blocks per query tile): visited "
          + " ".join(f"{r['visited']:.3f}" for r in block_rows) + " per layer; kept fraction "
          + f"{sum(float(jnp.sum(k)) for k in bkeeps) / full_total:.3f}")
    pmk = [jnp.take(x, perms[lv], axis=2) if lv in perms else x for x, lv in zip(ks, levels)]
    pmv = [jnp.take(x, perms[lv], axis=2) if lv in perms else x for x, lv in zip(vs, levels)]
    step_args["boltzmann[block-sampled]"] = (qs, pmk, pmv, bkeeps, cts)
    steps["boltzmann[block-sampled]"] = steps["boltzmann"]

  t0 = time.time()
  calls, by_program = {}, {}
  for name, step in steps.items():
    # The patch-major variant is the same program on permuted inputs of the same shapes: one compile.
    if id(step) not in by_program:
      by_program[id(step)] = compiled(step, step_args[name])
    else:
      jax.block_until_ready(by_program[id(step)](*step_args[name]))  # its own warm-up run
    calls[name] = by_program[id(step)]
  print(f"# compiled and warmed up {len(by_program)} programs in {time.time() - t0:.1f}s (excluded from the"
        " timings)")

  status = 0
  check = None
  if args.check:
    tol = TOLERANCES["bfloat16" if dtype == jnp.bfloat16 else "float32"]
    ref_outs, ref_grads = calls["dense_sampled"](*step_args["dense_sampled"])
    outs, grads = calls["boltzmann"](*step_args["boltzmann"])
    err_fwd = max(max_rel_error(a, r) for a, r in zip(outs, ref_outs))
    err_grad = max(max_rel_error(a, r) for ga, gr in zip(grads, ref_grads) for a, r in zip(ga, gr))
    ok = err_fwd <= tol["fwd"] and err_grad <= tol["grad"]
    lowered_ok = None
    if backend == "pallas" and lowering in _KERNEL_CALLS and jax.default_backend() in ("gpu", "tpu"):
      text = steps["boltzmann"].lower(*step_args["boltzmann"]).as_text()
      lowered_ok = any(name in text for name in _KERNEL_CALLS[lowering])
      ok = ok and lowered_ok
    check = {"ok": ok, "max_rel_err_fwd": err_fwd, "max_rel_err_grad": err_grad, "tolerance": tol,
                 "kernel_lowered": lowered_ok}
    print(f"# check boltzmann[{backend}] vs dense_sampled on the same keep masks: "
          f"{'PASS' if ok else 'FAIL'}: output {err_fwd:.2e} (tol {tol['fwd']}), grads {err_grad:.2e}"
          f" (tol {tol['grad']}), relative to max(1, max|ref|)"
          + ("" if lowered_ok is None else f"; Pallas kernel call in the lowered step: {lowered_ok}"))
    if not ok:
      status = 1

  times = time_interleaved(calls, step_args, args.reps)
  med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  for name in calls:
    print(f"  {name:<24} fwd+bwd {med[name]:10.2f} ms  (median of {args.reps}; min"
          f" {1e3 * min(times[name]):.2f} ms)")
  ratios = {}
  for name in calls:
    if name == "dense_sampled":
      continue
    ratios[name] = statistics.median(a / c for a, c in zip(times["dense_sampled"], times[name]))
    note = (" [different sampling semantics: whole key blocks; dense_sampled's time does not depend on the"
            " mask]" if name.endswith("[block-sampled]") else f", kept fraction {kept_fraction:.3f}")
    print(f"ratio dense_sampled / {name}: {ratios[name]:.2f}x (median of paired per-rep ratios; > 1 = ours"
          f" faster){note}")
  extra, full_model = full_model_rows(args, backend) if args.full_model else ([], None)
  for line in extra:
    print(line)
  print(f"# total {time.time() - t_start:.1f}s")
  if args.json:
    payload = {"device": str(dev), "jax": jax.__version__, "load_average": load, "backend": backend,
               "dtype": args.dtype, "batch": b, "queries": nq, "hidden": args.hidden, "heads": h,
               "layers": args.layers, "image_size": args.image_size, "sample_ratio": args.sample_ratio,
               "block_sizes": [bsz.block_q, bsz.block_k], "layers_detail": layer_rows,
               "kept_fraction": kept_fraction, "median_ms": med, "ratio": ratios, "check": check,
               "block_sampled": block_rows or None, "full_model": full_model}
    tmp = args.json + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=1)
    os.replace(tmp, args.json)
  return status


if __name__ == "__main__":
  sys.exit(main())
