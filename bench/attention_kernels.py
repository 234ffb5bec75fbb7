"""Sparse-attention benchmark: executed FLOPs, bytes and time vs dense attention.

Compares, per case, on the same inputs and the same Boltzmann sample:
  dense_masked  dense attention under the kept-key boolean mask, in XLA (what
                the public BoltzFormer code does);
  dpa           jax.nn.dot_product_attention over all keys, no mask (cuDNN
                flash attention on GPU; XLA on CPU): FULL attention, a
                different computation from the sampled one, so every ratio
                against it is printed with that label;
  ours          the Pallas kernel on GPU/TPU, the XLA fallback on CPU (the
                interpret-mode kernels are for correctness, not speed).
For token selection the `dense` baseline is full attention over all N keys
(also a different computation; labelled the same way). Only the Boltzmann
`dense_masked` ratio compares the same sampled attention.
Cases sweep the keep ratio (0.01-0.5), the temperature, and the size: cross
attention of ~100 object queries over H x W feature maps (32^2 ... 256^2 keys)
and self attention with Q = N (up to 16k); token selection with k = N/8.

FLOPs: "executed" counts what each method computes (4 * D per query-key pair:
QK^T and PV), including masked entries inside visited tiles; "useful" counts
only kept pairs. Bytes: XLA's own cost analysis where XLA compiles the method;
for the Pallas kernels an analytic count of the tiles they read and write.

Commands:
  python bench/attention_kernels.py --quick          # CPU, a couple of minutes
  python bench/attention_kernels.py --gpu            # GPU full sweep (~3 min)
  python bench/attention_kernels.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import boltzmann_attention as ba  # noqa: E402
from pallas_kernels import boltzmann_sampling as bs  # noqa: E402
from pallas_kernels import common  # noqa: E402
from pallas_kernels import token_selection as ts  # noqa: E402
from pallas_kernels.common import BlockSizes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  op: str  # 'boltzmann' | 'tokens'
  kind: str  # 'cross' | 'self'
  side: int  # keys = side * side (a feature map)
  ratio: float  # Boltzmann sample ratio, or selected fraction for tokens
  temperature: float = 0.5
  granularity: str = "key"
  queries: int = 100

  @property
  def num_keys(self) -> int:
    return self.side * self.side

  @property
  def num_queries(self) -> int:
    return self.num_keys if self.kind == "self" else self.queries

  def label(self) -> str:
    if self.op == "tokens":
      return f"tokens {self.kind} Q={self.num_queries} N={self.num_keys} k=N*{self.ratio:g}"
    return (f"boltz {self.kind} Q={self.num_queries} N={self.num_keys} ratio={self.ratio:g}"
            f" T={self.temperature:.3g} {self.granularity}")


def quick_cases() -> list[Case]:
  """CPU sweep: every size at 10%, the ratio/temperature sweeps at 64^2 keys."""
  cases = []
  for g in ("key", "block"):
    cases += [Case("boltzmann", "cross", s, 0.1, granularity=g) for s in (32, 64, 128)]
  for g in ("key", "block"):
    cases += [Case("boltzmann", "cross", 64, r, granularity=g) for r in (0.01, 0.05, 0.25, 0.5)]
  cases += [Case("boltzmann", "cross", 64, 0.1, temperature=t) for t in (0.2, 0.1)]
  for g in ("key", "block"):
    cases += [Case("boltzmann", "self", s, 0.1, granularity=g) for s in (32, 45)]
  cases += [Case("tokens", "cross", 128, 1 / 8), Case("tokens", "self", 45, 1 / 8)]
  return cases


def full_cases() -> list[Case]:
  cases = []
  for g in ("block", "key"):
    cases += [Case("boltzmann", "self", s, 0.1, granularity=g) for s in (64, 91, 128)]
  cases += [Case("boltzmann", "self", 128, r, granularity="block") for r in (0.01, 0.05, 0.25, 0.5)]
  cases += [Case("tokens", "self", 128, 1 / 8), Case("tokens", "cross", 256, 1 / 8)]
  for g in ("key", "block"):
    cases += [Case("boltzmann", "cross", s, 0.1, granularity=g) for s in (32, 64, 128, 256)]
    cases += [Case("boltzmann", "cross", 128, r, granularity=g) for r in (0.01, 0.05, 0.25, 0.5)]
  cases += [Case("boltzmann", "cross", 128, 0.1, temperature=t) for t in (0.2, 0.1)]
  return cases


# ----------------------------------------------------------------- inputs
def blob_scores(case: Case, seed: int = 0) -> jax.Array:
  """BoltzFormer-like scores: sigmoid of a per-query mask logit map [1, Q, N].

  Each query "predicts" a small round object: cross-attention queries at
  random places, self-attention queries (pixels) around their own position.
  """
  side, nq = case.side, case.num_queries
  rng = np.random.default_rng(seed)
  if case.kind == "self":
    pos = np.arange(nq)
    cy, cx = pos // side + rng.normal(0, 2, nq), pos % side + rng.normal(0, 2, nq)
  else:
    cy, cx = rng.uniform(0, side, nq), rng.uniform(0, side, nq)
  radius = rng.uniform(2.0, max(3.0, side / 8.0), nq)
  cy, cx, radius = (jnp.asarray(a, jnp.float32)[:, None] for a in (cy, cx, radius))

  @jax.jit
  def make():
    yy, xx = jnp.divmod(jnp.arange(side * side, dtype=jnp.int32), side)
    d2 = (yy[None].astype(jnp.float32) - cy) ** 2 + (xx[None].astype(jnp.float32) - cx) ** 2
    return jax.nn.sigmoid(6.0 * (1.0 - d2 / radius ** 2))[None]

  return make()


def qkv(case: Case, heads: int, head_dim: int, dtype) -> tuple[jax.Array, ...]:
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  # Flat draws then reshape: threefry compiles slowly for high-rank shapes.
  mk = lambda r, shape: jax.random.normal(r, (math.prod(shape),), jnp.float32).reshape(shape).astype(dtype)
  q = mk(keys[0], (1, heads, case.num_queries, head_dim))
  k = mk(keys[1], (1, heads, case.num_keys, head_dim))
  v = mk(keys[2], (1, heads, case.num_keys, head_dim))
  return q, k, v


# ----------------------------------------------------------------- timing
def _cost(compiled) -> tuple[float | None, float | None]:
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return ca.get("flops"), ca.get("bytes accessed")
  except Exception:  # noqa: BLE001 - cost analysis is best effort
    return None, None


def compile_fn(fn: Callable, args) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm-up
  flops, nbytes = _cost(compiled)
  return dict(call=compiled, args=args, xla_flops=flops, xla_bytes=nbytes, times=[])


def measure(entries: list[dict], reps: int) -> None:
  """Interleaves the methods' runs (round robin, alternating direction) and
  keeps every wall time.

  Interleaving spreads background load (a shared 2-core CPU) evenly over the
  methods being compared; `best` (min) is the least-disturbed run.
  """
  for rep in range(reps):
    # Alternate the order so no method always runs right after another one.
    for e in (entries if rep % 2 == 0 else entries[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(e["call"](*e["args"]))
      e["times"].append(time.perf_counter() - t0)
  for e in entries:
    e["ms"] = 1e3 * min(e["times"])
    e["median_ms"] = 1e3 * statistics.median(e["times"])


def dense_masked(q, k, v, mask):
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def dense_dpa(q, k, v, implementation=None):
  """jax.nn.dot_product_attention on [B, L, H, D] inputs (its native layout,
  prepared outside the timed call so the baseline pays no transposes)."""
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


# ----------------------------------------------------------------- one case
def run_case(case: Case, args, on_accel: bool) -> list[dict]:
  heads, d = args.heads, args.head_dim
  dtype = jnp.bfloat16 if on_accel else jnp.float32
  isz = jnp.dtype(dtype).itemsize
  q, k, v = qkv(case, heads, d, dtype)
  nq, n = case.num_queries, case.num_keys
  bsz = BlockSizes.get_default(args.lowering)
  dense_flops = 4.0 * heads * nq * n * d
  pending = []

  def record(method, fn, fn_args, flops, nbytes, useful=None, note=""):
    e = compile_fn(fn, fn_args)
    e.update(method=method, flops=flops, bytes=nbytes, useful_flops=useful, note=note)
    pending.append(e)

  if case.op == "boltzmann":
    scores = blob_scores(case)
    rng = jax.random.PRNGKey(2)
    if case.granularity == "key":
      sample_fn = lambda s: bs.sample_kept_keys(rng, s, temperature=case.temperature,
                                                sample_ratio=case.ratio)
      sample_out = sample_fn  # indices, counts and the dense mask
      kept = sample_fn(scores)
      mask = kept.to_mask()[:, 0]
      layout = bs.block_sparse_layout(kept, block_q=bsz.block_q, block_k=bsz.block_k)
      xla_sample = kept
    else:
      sample_fn = lambda s: bs.sample_kept_blocks(
          rng, s, temperature=case.temperature, sample_ratio=case.ratio,
          block_q=bsz.block_q, block_k=bsz.block_k)
      sample_out = sample_fn  # the whole layout (both lists)
      layout = sample_fn(scores)
      mask = layout.to_dense_mask()[:, 0]
      xla_sample = layout
    kept_pairs = float(jnp.sum(mask))
    useful = 4.0 * heads * d * kept_pairs
    visited = float(jnp.sum(layout.block_counts))
    kernel_flops = 4.0 * heads * d * visited * bsz.block_q * bsz.block_k
    kernel_bytes = heads * (visited * bsz.block_k * 2 * d * isz + 2 * nq * d * isz)
    if layout.mask is not None:
      kernel_bytes += visited * bsz.block_q * bsz.block_k  # int8 mask tiles
    frac = visited / (layout.num_q_tiles * layout.num_k_blocks)
    note = (f"kept {kept_pairs / (nq * n):.3f} of pairs; kernel visits {frac:.3f} of"
            f" {bsz.block_q}x{bsz.block_k} tiles")
    record("sample", sample_out, (scores,), None, None,
           note="sampling only (not in attention times)")
    record("dense_masked", dense_masked, (q, k, v, mask), dense_flops, None)
    if on_accel:
      ours = lambda q, k, v, lay: ba.boltzmann_attention(q, k, v, lay, block_sizes=bsz,
                                                         lowering=args.lowering)
      record("ours_pallas", ours, (q, k, v, layout), kernel_flops, kernel_bytes, useful, note)
    form = ba._choose_formulation(xla_sample, n)
    if form == "gather":
      xla_flops = 4.0 * heads * d * nq * xla_sample.indices.shape[-1]
    elif form == "blocks":
      xla_flops = 4.0 * heads * d * layout.num_q_tiles * bsz.block_q * layout.max_blocks * bsz.block_k
    else:
      xla_flops = dense_flops
    if not on_accel or args.with_xla:
      xla = lambda q, k, v, smp: ba.boltzmann_attention_xla(q, k, v, smp)
      record(f"ours_xla[{form}]", xla, (q, k, v, xla_sample), xla_flops, None, useful, note)
  else:
    budget = max(1, int(round(case.ratio * n)))
    idx, cnt = ts.select_top_k(blob_scores(case)[0, :1], budget)
    useful = 4.0 * heads * d * nq * budget
    record("dense", lambda q, k, v: dense_masked(q, k, v, jnp.ones((1, 1, n), bool)),
           (q, k, v), dense_flops, None)
    if on_accel:
      ours = lambda q, k, v, i, c: ts.token_selection_attention(q, k, v, i, c, block_sizes=bsz,
                                                                lowering=args.lowering)
      kp = common.round_up(budget, bsz.block_k)
      qp = common.round_up(nq, bsz.block_q)
      kbytes = heads * ((qp // bsz.block_q) * kp * 2 * d * isz + 2 * nq * d * isz)
      record("ours_pallas", ours, (q, k, v, idx, cnt), 4.0 * heads * d * qp * kp, kbytes, useful)
    if not on_accel or args.with_xla:
      xla = lambda q, k, v, i, c: ts.token_selection_attention_xla(q, k, v, i, c)
      record("ours_xla", xla, (q, k, v, idx, cnt), 4.0 * heads * d * nq * budget, None, useful)
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  try:
    blhd = tuple(jax.block_until_ready(x.swapaxes(1, 2)) for x in (q, k, v))
    record(f"dpa[{impl or 'xla'}]", functools.partial(dense_dpa, implementation=impl),
           blhd, dense_flops, None)
  except Exception as e:  # noqa: BLE001 - report and go on
    print(f"  dpa unavailable: {type(e).__name__}: {str(e)[:120]}")
  measure(pending, args.reps)
  base = next(e for e in pending if e["method"] in ("dense_masked", "dense"))
  dpa = next((e for e in pending if e["method"].startswith("dpa")), None)

  def paired(ref, e):
    # Median over reps of the per-rep ratio: runs are interleaved, so load
    # drift on a shared machine cancels in each pair.
    if ref is None:
      return None
    return statistics.median(a / b for a, b in zip(ref["times"], e["times"]))

  # What each ratio compares. Boltzmann: dense_masked computes the same sampled
  # attention (the kept-key mask), so that ratio is like for like. Token
  # selection's baseline and dpa attend to all N keys: a different (full)
  # computation, and every ratio against them says so.
  dense_is_same = case.op == "boltzmann"
  return [dict(case=case.label(), method=e["method"], ms=e["ms"], median_ms=e["median_ms"],
               speedup_vs_dense=paired(base, e), speedup_vs_dpa=paired(dpa, e),
               dense_baseline=("dense masked: same sampled attention" if dense_is_same
                               else "full attention over all keys: a different computation"),
               dpa_baseline="full attention over all keys, no mask: a different computation",
               flops=e["flops"], bytes=e["bytes"] if e["bytes"] is not None else e["xla_bytes"],
               useful_flops=e["useful_flops"], note=e["note"]) for e in pending]


def print_rows(rows: list[dict]) -> None:
  print(rows[0]["case"])
  for r in rows:
    gflop = f"{r['flops'] / 1e9:9.3f}" if r["flops"] else "        -"
    gbyte = f"{r['bytes'] / 1e9:8.4f}" if r["bytes"] else "       -"
    rel = ""
    if r["method"] != "sample":
      same = r["dense_baseline"].startswith("dense masked")
      rel = f"  x{r['speedup_vs_dense']:6.2f} vs {'dense masked (same sampled attention)' if same else 'FULL attention (different computation)'}"
      if r["speedup_vs_dpa"] is not None:
        rel += f"  x{r['speedup_vs_dpa']:6.2f} vs dpa (FULL attention, different computation)"
    print(f"  {r['method']:<22} {r['ms']:10.3f} ms  {gflop} GFLOP  {gbyte} GB{rel}"
          + (f"  [{r['note']}]" if r["note"] else ""))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="CPU sweep, a couple of minutes")
  mode.add_argument("--gpu", action="store_true", help="full sweep on the accelerator")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--lowering", default=None, help="gpu|tpu (default: platform)")
  p.add_argument("--with-xla", action="store_true", help="also time the XLA fallback on GPU/TPU")
  p.add_argument("--budget-s", type=float, default=None,
                 help="stop starting new cases after this many seconds")
  p.add_argument("--only", default=None, help="substring filter on case labels")
  p.add_argument("--json", default=None, help="write all rows to this JSON file")
  args = p.parse_args(argv)
  on_accel = jax.default_backend() in ("gpu", "tpu")
  if args.gpu and not on_accel:
    print("--gpu needs a GPU/TPU backend; use --quick on CPU.", file=sys.stderr)
    return 2
  args.lowering = args.lowering or common.default_lowering()
  full = args.gpu or (on_accel and not args.quick)
  args.reps = args.reps or (10 if on_accel else 5)
  args.budget_s = args.budget_s or (170.0 if full else 600.0)
  cases = full_cases() if full else quick_cases()
  if args.only:
    cases = [c for c in cases if args.only in c.label()]
  dev = jax.devices()[0]
  print(f"# {dev.platform}: {getattr(dev, 'device_kind', '')}, {os.cpu_count()} CPU cores,"
        f" JAX {jax.__version__}, {platform.machine()}; heads={args.heads}"
        f" head_dim={args.head_dim}; {'bf16' if on_accel else 'fp32'}; ms = best of {args.reps}"
        " interleaved runs; x = median of per-run paired speedups")
  start, all_rows = time.time(), []
  for case in cases:
    if time.time() - start > args.budget_s:
      print(f"# budget of {args.budget_s:.0f}s reached; skipped the remaining cases")
      break
    rows = run_case(case, args, on_accel)
    print_rows(rows)
    sys.stdout.flush()
    all_rows += rows
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(dev), jax=jax.__version__, rows=all_rows), f, indent=1)
  print(f"# total {time.time() - start:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
