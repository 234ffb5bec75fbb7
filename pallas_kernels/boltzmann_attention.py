"""Boltzmann-sampled sparse attention (BoltzFormer): kernel, reference, fallback.

The attention itself is ordinary softmax attention restricted, per query, to the
keys that Boltzmann sampling kept (`boltzmann_sampling`). The public BoltzFormer
code computes it densely under a boolean mask, so the sparsity saves nothing.
Here:

* `boltzmann_attention` -- the Pallas kernel. Flash-style (online softmax, fp32
  accumulation); each query tile walks only the key blocks listed for it in a
  `BlockSparseLayout` and masks per key inside partially kept blocks. A
  `custom_vjp` gives dq, dk, dv with two more block-sparse kernels (dq walks
  the same lists; dk/dv walk the transposed lists). Two lowerings:
  'gpu' (Pallas Triton: the key loop runs inside one program per query tile,
  block ids read from an index operand) and 'tpu' (Mosaic: block ids are
  scalar-prefetched into SMEM and drive the K/V BlockSpec index maps, so the
  pipeline DMAs only listed blocks; padded list entries repeat the last block
  so they cost no DMA).
* `boltzmann_attention_reference` -- dense masked attention in fp32; the twin
  every test compares against.
* `boltzmann_attention_xla` -- the CPU path for real work, bounded in memory:
  block-sparse gather of kept key blocks, or per-query gather of kept keys in
  query chunks, or dense masked attention, whichever is cheapest for the
  sample's static bounds -- and, for per-key samples, its run-time set sizes
  (see `_choose_formulation`, `_adaptive`).

Layout: [batch, heads, length, head_dim]; grouped-query k/v allowed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.boltzmann_sampling import BlockSparseLayout
from pallas_kernels.boltzmann_sampling import KeptKeys
from pallas_kernels.boltzmann_sampling import effective_mask
from pallas_kernels.common import BlockSizes

# Relative cost, per (query, key) pair, of the gather formulation against dense
# masked attention in XLA on CPU: gathering a [n, D] slab per query moves
# memory that a dense matmul would reuse from cache. Measured on a 2-core CPU
# (100 queries, 8 heads, D=64; paired runs): gather is 1.4x faster than dense
# at 1% of 16k keys, even at 2%, 0.5x at 4%. Per-key samples use the gather path
# only when n * factor <= N (at most ~1.6% of the keys).
GATHER_COST_FACTOR = 64


# ============================================================================
# Reference twin.
# ============================================================================
def boltzmann_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
  """Dense softmax attention over the kept keys, in fp32.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] with Hkv dividing H.
    mask: bool [B, Q, N] or [B, Hs, Q, N] (Hs dividing H): kept keys. Rows
      with nothing kept attend everywhere.
  Returns:
    [B, H, Q, D] in q.dtype.
  """
  _, group = common.check_qkv(q, k, v)
  b, h, nq, d = q.shape
  scale = common.default_scale(d, sm_scale)
  mask = mask[:, None] if mask.ndim == 3 else mask
  mask = jnp.repeat(effective_mask(mask.astype(jnp.bool_)), h // mask.shape[1], axis=1)
  kf = jnp.repeat(k, group, axis=1).astype(jnp.float32)
  vf = jnp.repeat(v, group, axis=1).astype(jnp.float32)
  s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), kf,
                 precision=lax.Precision.HIGHEST) * scale
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhqk,bhkd->bhqd", p, vf, precision=lax.Precision.HIGHEST)
  return o.astype(q.dtype)


# ============================================================================
# XLA fallback.
# ============================================================================
def _masked_softmax_attend(s, valid, v_slab, spec_pv):
  """softmax over the trailing kept axis (fp32), invalid entries exactly 0."""
  s = jnp.where(valid, s, -jnp.inf)
  # The stabiliser cancels out of the result: no gradient through it.
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  return jnp.einsum(spec_pv, p.astype(v_slab.dtype), v_slab,
                    preferred_element_type=jnp.float32)


def _dense_masked(q, k, v, mask, scale, empty=None):
  """Dense masked attention (the baseline formulation), made as lean as it goes.

  No K/V head copies for GQA; the softmax normaliser is applied to the
  [Q, D] output instead of the [Q, N] probabilities (one fewer pass over the
  score matrix); `empty` ([B, Hs, Q] rows with nothing kept, e.g. from
  KeptKeys.counts) avoids a reduction over the mask to find them.
  """
  b, h, nq, d = q.shape
  hkv = k.shape[1]
  if empty is None:
    mask = effective_mask(mask)
  else:
    mask = mask | empty[..., None]
  hs = mask.shape[1]
  q5 = (q * jnp.asarray(scale, q.dtype)).reshape(b, hkv, h // hkv, nq, d)
  s = jnp.einsum("bkgqd,bknd->bkgqn", q5, k, preferred_element_type=jnp.float32)
  s = s.reshape(b, hs, h // hs, nq, -1)
  s = jnp.where(mask[:, :, None], s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # cancels out of o
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True).reshape(b, hkv, h // hkv, nq, 1)
  p = p.reshape(b, hkv, h // hkv, nq, -1).astype(v.dtype)
  o = jnp.einsum("bkgqn,bknd->bkgqd", p, v, preferred_element_type=jnp.float32) / l
  return o.reshape(b, h, nq, d)


def _chunked_map(body, xs, num_items: int, chunk: int):
  """Applies `body` to `chunk`-sized slices of axis 0 of every array in xs.

  Sequential (lax.map) so only one chunk's intermediates are live, and
  rematerialised under autodiff (jax.checkpoint) so the backward pass does not
  keep every chunk's gathered slab alive either.
  """
  n_chunks = common.cdiv(num_items, chunk)
  padded = n_chunks * chunk
  xs = jax.tree.map(
      lambda x: common.pad_axis(x, 0, padded).reshape((n_chunks, chunk) + x.shape[1:]), xs)
  out = lax.map(jax.checkpoint(body), xs)
  return out.reshape((padded,) + out.shape[2:])[:num_items]


def _gather_per_query(q, k, v, kept: KeptKeys, scale):
  """Each query gathers its own <= n kept keys; query-chunked to stay in budget.

  A chunk of c queries materialises 2 * c * n * D gathered elements per gather
  head; c is chosen so that this is at most the dense score matrix of those
  heads (r * Q * N), the memory bound the dense formulation would need anyway.
  """
  b, h, nq, d = q.shape
  n = kept.indices.shape[-1]
  qg, kg, vg, hg, r = common.gather_heads(q, k, v, kept.indices.shape[1])
  idx = jnp.repeat(kept.indices, hg // kept.indices.shape[1], axis=1)
  cnt = jnp.repeat(kept.counts, hg // kept.counts.shape[1], axis=1)
  budget = r * nq * kept.num_keys
  chunk = int(max(1, min(nq, budget // (2 * n * d))))

  gather = jax.vmap(jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0, mode="clip")))

  def body(args):
    qc, ic, cc = args  # [c, B, G', r, D], [c, B, G', n], [c, B, G']
    ks = gather(kg, jnp.moveaxis(ic, 0, 2))  # [B, G', c, n, D]
    vs = gather(vg, jnp.moveaxis(ic, 0, 2))
    s = jnp.einsum("cbgrd,bgcnd->cbgrn", qc, ks, preferred_element_type=jnp.float32) * scale
    valid = (jnp.arange(n) < cc[..., None])[:, :, :, None, :]
    return _masked_softmax_attend(s, valid, vs, "cbgrn,bgcnd->cbgrd")

  xs = (jnp.moveaxis(qg, 3, 0), jnp.moveaxis(idx, 2, 0), jnp.moveaxis(cnt, 2, 0))
  out = _chunked_map(body, xs, nq, chunk)  # [Q, B, G', r, D]
  out = jnp.moveaxis(out, 0, 3).reshape(b, h, nq, d)
  # Rows with nothing kept attend everywhere; they only arise from non-finite
  # scores, so the dense pass runs only when one exists.
  empty = jnp.repeat(kept.counts == 0, h // kept.counts.shape[1], axis=1)
  return lax.cond(
      jnp.any(empty),
      lambda: jnp.where(empty[..., None],
                        _dense_masked(q, k, v, kept.to_mask(), scale), out),
      lambda: out)


def _gather_blocks(q, k, v, layout: BlockSparseLayout, scale):
  """Each query tile gathers its listed key blocks; tile-chunked to stay in budget.

  For whole-block layouts (key-block sampling). Per-key layouts list every
  touched block (at 10% that is all of them), so they go dense instead.
  """
  if layout.mask is not None:
    raise ValueError(
        "formulation='blocks' is for whole-block layouts (sample_kept_blocks); per-key"
        " layouts carry an in-block mask: use formulation='dense' (or 'auto').")
  b, h, nq, d = q.shape
  bq, bk = layout.block_q, layout.block_k
  qt, kb, mb = layout.num_q_tiles, layout.num_k_blocks, layout.max_blocks
  hs = layout.block_indices.shape[1]
  q = common.pad_axis(q, 2, qt * bq)
  k = common.pad_axis(k, 2, kb * bk)
  v = common.pad_axis(v, 2, kb * bk)
  qg, kg, vg, hg, r = common.gather_heads(q, k, v, hs)
  kg = kg.reshape(b, hg, kb, bk, d)
  vg = vg.reshape(b, hg, kb, bk, d)
  qg = qg.reshape(b, hg, r, qt, bq, d)
  rep = hg // hs
  idx = jnp.repeat(layout.block_indices, rep, axis=1)  # [B, G', QT, MB]
  cnt = jnp.repeat(layout.block_counts, rep, axis=1)
  budget = r * nq * layout.num_keys
  chunk = int(max(1, min(qt, budget // max(1, 2 * mb * bk * d))))
  take = jax.vmap(jax.vmap(lambda blocks, i: jnp.take(blocks, i, axis=0)))
  key_pos = jnp.arange(bk)

  def body(args):
    qc, ic, cc = args  # [t, B, G', r, bq, D], [t, B, G', MB], [t, B, G']
    ks = take(kg, jnp.moveaxis(ic, 0, 2))  # [B, G', t, MB, bk, D]
    vs = take(vg, jnp.moveaxis(ic, 0, 2))
    s = jnp.einsum("tbgrqd,bgtmkd->tbgrqmk", qc, ks,
                   preferred_element_type=jnp.float32) * scale
    valid = (jnp.arange(mb) < cc[..., None])[..., None]  # [t, B, G', MB, 1]
    valid = valid & (ic[..., None] * bk + key_pos < layout.num_keys)
    valid = valid[:, :, :, None, None]  # [t, B, G', 1, 1, MB, bk]
    shp = s.shape
    flat = lambda x: x.reshape(x.shape[:5] + (mb * bk,))
    o = _masked_softmax_attend(
        flat(s), flat(jnp.broadcast_to(valid, shp)),
        vs.reshape(b, hg, -1, mb * bk, d), "tbgrqj,bgtjd->tbgrqd")
    return o

  xs = (jnp.moveaxis(qg, 3, 0), jnp.moveaxis(idx, 2, 0), jnp.moveaxis(cnt, 2, 0))
  out = _chunked_map(body, xs, qt, chunk)  # [QT, B, G', r, bq, D]
  out = jnp.moveaxis(out, 0, 3).reshape(b, h, qt * bq, d)
  return out[:, :, :nq]


def _gather_width(num_keys: int) -> int:
  """Widest per-query gather that still beats dense attention on CPU."""
  return num_keys // GATHER_COST_FACTOR


def _adaptive(q, k, v, kept: KeptKeys, scale):
  """Gather when, at run time, every kept set fits the profitable width.

  The static bound n (number of draws) is what shapes must use, but low
  temperatures concentrate the draws: at T = 0.1 with 10% draws only ~2% of
  the keys are distinct. `lax.cond` then takes the gather branch on the first
  `_gather_width` entries of each (sorted, sentinel-padded) set, else the dense
  branch. Both branches are memory-bounded; only one runs.
  """
  w = max(1, min(_gather_width(kept.num_keys), kept.indices.shape[-1]))
  narrow = KeptKeys(indices=kept.indices[..., :w], counts=kept.counts, num_keys=kept.num_keys,
                    mask=kept.mask)
  return lax.cond(
      jnp.max(kept.counts) <= w,
      lambda: _gather_per_query(q, k, v, narrow, scale),
      lambda: _dense_masked(q, k, v, kept.to_mask(), scale, kept.counts == 0))


def xla_needs_mask(num_keys: int, num_draws: int) -> bool:
  """Whether `boltzmann_attention_xla` may read KeptKeys.mask (else: pure gather)."""
  return num_draws > _gather_width(num_keys)


def _choose_formulation(sample, num_keys: int) -> str:
  """Cheapest formulation for a sample from its static bounds."""
  if isinstance(sample, KeptKeys):
    # 'adaptive' is not chosen automatically: with the profitable width at
    # ~1.6% of the keys its gather branch rarely fires at realistic
    # temperatures, and the cond costs a few percent when it does not.
    return "gather" if sample.indices.shape[-1] <= _gather_width(num_keys) else "dense"
  if isinstance(sample, BlockSparseLayout):
    # Gathering blocks pays off when the listed blocks cover at most a third of
    # the keys (measured on CPU: 2.8x faster at 25%, 0.8x at 50%). Per-key
    # layouts list every block: no static saving, go dense.
    sparse = 3 * sample.max_blocks * sample.block_k <= num_keys
    return "blocks" if sample.mask is None and sparse else "dense"
  return "dense"


def boltzmann_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sample: KeptKeys | BlockSparseLayout | jax.Array,
    *,
    sm_scale: float | None = None,
    formulation: str = "auto",
) -> jax.Array:
  """Sparse attention in plain XLA, memory-bounded; differentiable by autodiff.

  Args:
    q, k, v: [B, H, Q, D], [B, Hkv, N, D].
    sample: per-query `KeptKeys`, a `BlockSparseLayout`, or a bool mask
      [B, (Hs,) Q, N].
    formulation: 'auto' | 'dense' | 'gather' (KeptKeys) | 'adaptive' (KeptKeys:
      gather if at run time all kept sets are small enough, else dense) |
      'blocks' (layout).
      No formulation materialises more gathered K/V than the dense
      [queries, keys] score matrix of the same heads.
  """
  common.check_qkv(q, k, v)
  scale = common.default_scale(q.shape[-1], sm_scale)
  num_keys = k.shape[2]
  if formulation == "auto":
    formulation = _choose_formulation(sample, num_keys)
  if formulation in ("gather", "adaptive"):
    if not isinstance(sample, KeptKeys):
      raise ValueError(f"formulation={formulation!r} needs a KeptKeys sample.")
    if formulation == "gather":
      out = _gather_per_query(q, k, v, sample, scale)
    else:
      out = _adaptive(q, k, v, sample, scale)
  elif formulation == "blocks":
    if not isinstance(sample, BlockSparseLayout):
      raise ValueError("formulation='blocks' needs a BlockSparseLayout sample.")
    out = _gather_blocks(q, k, v, sample, scale)
  elif formulation == "dense":
    empty = None
    if isinstance(sample, KeptKeys):
      mask, empty = sample.to_mask(), sample.counts == 0
    elif isinstance(sample, BlockSparseLayout):
      mask = sample.to_dense_mask()
    else:
      mask = sample[:, None] if sample.ndim == 3 else sample
    out = _dense_masked(q, k, v, mask.astype(jnp.bool_), scale, empty)
  else:
    raise ValueError(
        f"formulation={formulation!r}; use 'auto', 'dense', 'gather', 'adaptive' or"
        " 'blocks'.")
  return out.astype(q.dtype)


# ============================================================================
# Pallas kernels.
# ============================================================================
@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable compile-time parameters of one kernel instantiation."""

  sm_scale: float
  block_q: int
  block_k: int
  num_keys: int
  group: int  # q heads per kv head
  sel_group: int  # q heads per layout head
  has_mask: bool
  lowering: str
  interpret: bool
  num_warps: int
  num_stages: int


def _key_valid(start, shape: tuple[int, int], num_keys: int):
  """[block_q, block_k] bool: keys of the block that exist (the last is padded).

  A 2-D iota at the tile's full shape: what both Triton and Mosaic lower
  directly (Mosaic handles 1-D vectors poorly).
  """
  return start + lax.broadcasted_iota(jnp.int32, shape, 1) < num_keys


# ---------------------------------------------------------------- GPU (Triton)
def _gpu_fwd_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, *rest, st: _Static):
  """One program = one (query tile, batch, head); loops over listed key blocks."""
  if st.has_mask:
    mask_ref, o_ref, lse_ref = rest
  else:
    mask_ref, (o_ref, lse_ref) = None, rest
  bq, d = q_ref.shape
  bk = st.block_k
  q = q_ref[...]

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(idx_ref[j] * bk, bk)
    kblk = k_ref[pl.ds(start, bk), :]
    vblk = v_ref[pl.ds(start, bk), :]
    s = common.dot_nt(q, kblk) * st.sm_scale
    valid = _key_valid(start, (bq, bk), st.num_keys)
    if mask_ref is not None:
      valid = valid & (mask_ref[:, pl.ds(start, bk)] != 0)
    return common.online_softmax_step(s, valid, vblk, m, l, acc)

  init = (jnp.full((bq, 1), common.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, d), jnp.float32))
  m, l, acc = lax.fori_loop(0, cnt_ref[0], body, init)
  out, lse = common.finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(bq)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref,
                   *rest, st: _Static):
  if st.has_mask:
    mask_ref, dq_ref = rest
  else:
    mask_ref, (dq_ref,) = None, rest
  bq, d = q_ref.shape
  bk = st.block_k
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]

  def body(j, dq):
    start = pl.multiple_of(idx_ref[j] * bk, bk)
    kblk = k_ref[pl.ds(start, bk), :]
    vblk = v_ref[pl.ds(start, bk), :]
    valid = _key_valid(start, (bq, bk), st.num_keys)
    if mask_ref is not None:
      valid = valid & (mask_ref[:, pl.ds(start, bk)] != 0)
    _, ds = common.backward_block(q, kblk, vblk, do, lse, delta, valid, st.sm_scale)
    return dq + common.dot_nn(ds.astype(kblk.dtype), kblk)

  dq = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qidx_ref, qcnt_ref,
                    *rest, st: _Static):
  """One program = one (key block, batch, q head); loops over visiting q tiles."""
  if st.has_mask:
    mask_ref, dk_ref, dv_ref = rest
  else:
    mask_ref, (dk_ref, dv_ref) = None, rest
  bk, d = k_ref.shape
  bq = st.block_q
  start_k = pl.program_id(0) * bk
  kblk, vblk = k_ref[...], v_ref[...]
  key_ok = _key_valid(start_k, (bq, bk), st.num_keys)

  def body(j, carry):
    dk, dv = carry
    qs = pl.multiple_of(qidx_ref[j] * bq, bq)
    q = q_ref[pl.ds(qs, bq), :]
    do = do_ref[pl.ds(qs, bq), :]
    lse = lse_ref[pl.ds(qs, bq)][:, None]
    delta = delta_ref[pl.ds(qs, bq)][:, None]
    valid = key_ok
    if mask_ref is not None:
      valid = valid & (mask_ref[pl.ds(qs, bq), :] != 0)
    p, ds = common.backward_block(q, kblk, vblk, do, lse, delta, valid, st.sm_scale)
    dv = dv + common.dot_tn(p.astype(do.dtype), do)
    dk = dk + common.dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(0, qcnt_ref[0], body, (zeros, zeros))
  dk_ref[...] = dk * st.sm_scale
  dv_ref[...] = dv


def _gpu_params(st: _Static):
  return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _pad_list(x: jax.Array) -> jax.Array:
  """Triton block shapes must be powers of two: pad the list axis."""
  return common.pad_axis(x, x.ndim - 1, common.next_power_of_2(x.shape[-1]))


def _gpu_forward(st: _Static, q, k, v, arrays):
  bidx, bcnt, _, _, mask = arrays
  b, h, qp, d = q.shape
  np_ = k.shape[2]
  bq = st.block_q
  qt = qp // bq
  bidx = _pad_list(bidx)
  mbp = bidx.shape[-1]
  g, r = st.group, st.sel_group
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0)),
      pl.BlockSpec((None, None, np_, d), lambda i, bb, hh: (bb, hh // g, 0, 0)),
      pl.BlockSpec((None, None, np_, d), lambda i, bb, hh: (bb, hh // g, 0, 0)),
      pl.BlockSpec((None, None, None, mbp), lambda i, bb, hh: (bb, hh // r, i, 0)),
      pl.BlockSpec((None, None, None, 1), lambda i, bb, hh: (bb, hh // r, i, 0)),
  ]
  operands = [q, k, v, bidx, bcnt[..., None]]
  if st.has_mask:
    in_specs.append(pl.BlockSpec((None, None, bq, np_), lambda i, bb, hh: (bb, hh // r, i, 0)))
    operands.append(mask)
  out, lse = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, st=st),
      grid=(qt, b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, qp), jnp.float32)],
      compiler_params=_gpu_params(st),
      interpret=st.interpret,
      name="boltzmann_attention_fwd",
  )(*operands)
  return out, lse


def _gpu_backward(st: _Static, q, k, v, arrays, out, lse, do):
  bidx, bcnt, qidx, qcnt, mask = arrays
  b, h, qp, d = q.shape
  np_ = k.shape[2]
  bq, bk = st.block_q, st.block_k
  qt, kb = qp // bq, np_ // bk
  g, r = st.group, st.sel_group
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  bidx = _pad_list(bidx)
  qidx = _pad_list(qidx)
  mbp, mqp = bidx.shape[-1], qidx.shape[-1]

  tile_spec = pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
  kv_full = pl.BlockSpec((None, None, np_, d), lambda i, bb, hh: (bb, hh // g, 0, 0))
  dq_specs = [tile_spec, kv_full, kv_full, tile_spec, row_spec, row_spec,
              pl.BlockSpec((None, None, None, mbp), lambda i, bb, hh: (bb, hh // r, i, 0)),
              pl.BlockSpec((None, None, None, 1), lambda i, bb, hh: (bb, hh // r, i, 0))]
  dq_ops = [q, k, v, do, lse, delta, bidx, bcnt[..., None]]
  if st.has_mask:
    dq_specs.append(pl.BlockSpec((None, None, bq, np_), lambda i, bb, hh: (bb, hh // r, i, 0)))
    dq_ops.append(mask)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, st=st),
      grid=(qt, b, h),
      in_specs=dq_specs,
      out_specs=tile_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_params(st),
      interpret=st.interpret,
      name="boltzmann_attention_dq",
  )(*dq_ops)

  q_full = pl.BlockSpec((None, None, qp, d), lambda j, bb, hh: (bb, hh, 0, 0))
  row_full = pl.BlockSpec((None, None, qp), lambda j, bb, hh: (bb, hh, 0))
  kv_blk = pl.BlockSpec((None, None, bk, d), lambda j, bb, hh: (bb, hh // g, j, 0))
  dkv_specs = [q_full, kv_blk, kv_blk, q_full, row_full, row_full,
               pl.BlockSpec((None, None, None, mqp), lambda j, bb, hh: (bb, hh // r, j, 0)),
               pl.BlockSpec((None, None, None, 1), lambda j, bb, hh: (bb, hh // r, j, 0))]
  dkv_ops = [q, k, v, do, lse, delta, qidx, qcnt[..., None]]
  if st.has_mask:
    dkv_specs.append(pl.BlockSpec((None, None, qp, bk), lambda j, bb, hh: (bb, hh // r, 0, j)))
    dkv_ops.append(mask)
  out_blk = pl.BlockSpec((None, None, bk, d), lambda j, bb, hh: (bb, hh, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, st=st),
      grid=(kb, b, h),
      in_specs=dkv_specs,
      out_specs=[out_blk, out_blk],
      out_shape=[jax.ShapeDtypeStruct((b, h, np_, d), jnp.float32)] * 2,
      compiler_params=_gpu_params(st),
      interpret=st.interpret,
      name="boltzmann_attention_dkv",
  )(*dkv_ops)
  return dq, dk, dv


# ---------------------------------------------------------------- TPU (Mosaic)
def _tpu_interpret(st: _Static):
  # The TPU interpreter simulates SMEM scalar prefetch, the block pipeline and
  # DMAs, and raises on out-of-bounds reads -- stricter than generic interpret.
  return pltpu.InterpretParams() if st.interpret else False


def _lanes(x):
  """[rows, 1] -> [rows, NUM_LANES]: per-row statistics stored lane-dense."""
  return jnp.broadcast_to(x, (x.shape[0], common.NUM_LANES))


def _tpu_fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, st: _Static,
                    heads_sel: int, q_tiles: int, max_blocks: int):
  """Grid (b, h, q tile, list slot); the K/V pipeline follows the prefetched list."""
  if st.has_mask:
    mask_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  else:
    mask_ref = None
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  tile = (b * heads_sel + h // st.sel_group) * q_tiles + i
  bq, bk = st.block_q, st.block_k

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(j < cnt_ref[tile])
  def _step():
    start = idx_ref[tile * max_blocks + j] * bk
    s = common.dot_nt(q_ref[...], k_ref[...]) * st.sm_scale
    valid = _key_valid(start, (bq, bk), st.num_keys)
    if mask_ref is not None:
      valid = valid & mask_ref[...]
    m, l, acc = common.online_softmax_step(
        s, valid, v_ref[...], m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
    m_scr[...] = _lanes(m)
    l_scr[...] = _lanes(l)
    acc_scr[...] = acc

  @pl.when(j == max_blocks - 1)
  def _finish():
    out, lse = common.finalize(m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = _lanes(lse)


def _tpu_dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   *rest, st: _Static, heads_sel: int, q_tiles: int, max_blocks: int):
  if st.has_mask:
    mask_ref, dq_ref, dq_scr = rest
  else:
    mask_ref, (dq_ref, dq_scr) = None, rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  tile = (b * heads_sel + h // st.sel_group) * q_tiles + i
  bq, bk = st.block_q, st.block_k

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(j < cnt_ref[tile])
  def _step():
    start = idx_ref[tile * max_blocks + j] * bk
    valid = _key_valid(start, (bq, bk), st.num_keys)
    if mask_ref is not None:
      valid = valid & mask_ref[...]
    kblk = k_ref[...]
    _, ds = common.backward_block(q_ref[...], kblk, v_ref[...], do_ref[...],
                                  lse_ref[...][:, :1], delta_ref[...][:, :1],
                                  valid, st.sm_scale)
    dq_scr[...] += common.dot_nn(ds.astype(kblk.dtype), kblk)

  @pl.when(j == max_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * st.sm_scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(qidx_ref, qcnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    *rest, st: _Static, heads_sel: int, k_blocks: int, q_tiles: int):
  """Grid (b, h, key block, list slot); q/do tiles follow the transposed list."""
  if st.has_mask:
    mask_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
  else:
    mask_ref = None
    dk_ref, dv_ref, dk_scr, dv_scr = rest
  b, h, kb, j = (pl.program_id(a) for a in range(4))
  blk = (b * heads_sel + h // st.sel_group) * k_blocks + kb
  bq, bk = st.block_q, st.block_k

  @pl.when(j == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(j < qcnt_ref[blk])
  def _step():
    valid = _key_valid(kb * bk, (bq, bk), st.num_keys)
    if mask_ref is not None:
      valid = valid & mask_ref[...]
    q, do = q_ref[...], do_ref[...]
    p, ds = common.backward_block(q, k_ref[...], v_ref[...], do, lse_ref[...][:, :1],
                                  delta_ref[...][:, :1], valid, st.sm_scale)
    dv_scr[...] += common.dot_tn(p.astype(do.dtype), do)
    dk_scr[...] += common.dot_tn(ds.astype(q.dtype), q)

  @pl.when(j == q_tiles - 1)
  def _finish():
    dk_ref[...] = dk_scr[...] * st.sm_scale
    dv_ref[...] = dv_scr[...]


def _tpu_forward(st: _Static, q, k, v, arrays):
  bidx, bcnt, _, _, mask = arrays
  b, h, qp, d = q.shape
  bq, bk = st.block_q, st.block_k
  hs, qt, mb = bidx.shape[1], bidx.shape[2], bidx.shape[3]
  g, r = st.group, st.sel_group
  tile = lambda bb, hh, i: (bb * hs + hh // r) * qt + i

  def kv_map(bb, hh, i, j, idx, cnt):
    return bb, hh // g, idx[tile(bb, hh, i) * mb + j], 0

  def mask_map(bb, hh, i, j, idx, cnt):
    return bb, hh // r, i, idx[tile(bb, hh, i) * mb + j]

  q_map = lambda bb, hh, i, j, idx, cnt: (bb, hh, i, 0)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map)]
  operands = [q, k, v]
  if st.has_mask:
    in_specs.append(pl.BlockSpec((None, None, bq, bk), mask_map))
    operands.append(mask.astype(jnp.bool_))
  kernel = functools.partial(_tpu_fwd_kernel, st=st, heads_sel=hs, q_tiles=qt, max_blocks=mb)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, qt, mb),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                     pl.BlockSpec((None, None, bq, common.NUM_LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, common.NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, common.NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, qp, common.NUM_LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(st),
      name="boltzmann_attention_fwd",
  )(bidx.reshape(-1), bcnt.reshape(-1), *operands)
  return out, lse[..., 0]


def _tpu_backward(st: _Static, q, k, v, arrays, out, lse, do):
  bidx, bcnt, qidx, qcnt, mask = arrays
  b, h, qp, d = q.shape
  np_ = k.shape[2]
  bq, bk = st.block_q, st.block_k
  hs, qt, mb = bidx.shape[1], bidx.shape[2], bidx.shape[3]
  kb = qidx.shape[2]
  g, r = st.group, st.sel_group
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  lse_l = jnp.broadcast_to(lse[..., None], lse.shape + (common.NUM_LANES,))
  delta_l = jnp.broadcast_to(delta[..., None], delta.shape + (common.NUM_LANES,))
  mask_b = mask.astype(jnp.bool_) if st.has_mask else None

  # dq: same walk as the forward pass.
  tile = lambda bb, hh, i: (bb * hs + hh // r) * qt + i
  q_map = lambda bb, hh, i, j, idx, cnt: (bb, hh, i, 0)
  kv_map = lambda bb, hh, i, j, idx, cnt: (bb, hh // g, idx[tile(bb, hh, i) * mb + j], 0)
  mask_map = lambda bb, hh, i, j, idx, cnt: (bb, hh // r, i, idx[tile(bb, hh, i) * mb + j])
  specs = [pl.BlockSpec((None, None, bq, d), q_map),
           pl.BlockSpec((None, None, bk, d), kv_map),
           pl.BlockSpec((None, None, bk, d), kv_map),
           pl.BlockSpec((None, None, bq, d), q_map),
           pl.BlockSpec((None, None, bq, common.NUM_LANES), q_map),
           pl.BlockSpec((None, None, bq, common.NUM_LANES), q_map)]
  ops = [q, k, v, do, lse_l, delta_l]
  if st.has_mask:
    specs.append(pl.BlockSpec((None, None, bq, bk), mask_map))
    ops.append(mask_b)
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, st=st, heads_sel=hs, q_tiles=qt, max_blocks=mb),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, qt, mb), in_specs=specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(st),
      name="boltzmann_attention_dq",
  )(bidx.reshape(-1), bcnt.reshape(-1), *ops)

  # dk, dv: walk the transposed lists (query tiles visiting each key block).
  blk = lambda bb, hh, kk: (bb * hs + hh // r) * kb + kk
  kv_own = lambda bb, hh, kk, j, qi, qc: (bb, hh // g, kk, 0)
  q_vis = lambda bb, hh, kk, j, qi, qc: (bb, hh, qi[blk(bb, hh, kk) * qt + j], 0)
  mask_vis = lambda bb, hh, kk, j, qi, qc: (bb, hh // r, qi[blk(bb, hh, kk) * qt + j], kk)
  specs = [pl.BlockSpec((None, None, bq, d), q_vis),
           pl.BlockSpec((None, None, bk, d), kv_own),
           pl.BlockSpec((None, None, bk, d), kv_own),
           pl.BlockSpec((None, None, bq, d), q_vis),
           pl.BlockSpec((None, None, bq, common.NUM_LANES), q_vis),
           pl.BlockSpec((None, None, bq, common.NUM_LANES), q_vis)]
  ops = [q, k, v, do, lse_l, delta_l]
  if st.has_mask:
    specs.append(pl.BlockSpec((None, None, bq, bk), mask_vis))
    ops.append(mask_b)
  out_map = lambda bb, hh, kk, j, qi, qc: (bb, hh, kk, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, st=st, heads_sel=hs, k_blocks=kb, q_tiles=qt),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, kb, qt), in_specs=specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), out_map)] * 2,
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct((b, h, np_, d), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(st),
      name="boltzmann_attention_dkv",
  )(qidx.reshape(-1), qcnt.reshape(-1), *ops)
  return dq, dk, dv


# ------------------------------------------------------------ custom_vjp glue
def _forward(st: _Static, q, k, v, arrays):
  if st.lowering == "tpu":
    return _tpu_forward(st, q, k, v, arrays)
  return _gpu_forward(st, q, k, v, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_flash(st: _Static, q, k, v, arrays):
  return _forward(st, q, k, v, arrays)[0]


def _sparse_flash_fwd(st: _Static, q, k, v, arrays):
  out, lse = _forward(st, q, k, v, arrays)
  return out, (q, k, v, arrays, out, lse)


def _sparse_flash_bwd(st: _Static, res, do):
  q, k, v, arrays, out, lse = res
  backward = _tpu_backward if st.lowering == "tpu" else _gpu_backward
  dq, dk_h, dv_h = backward(st, q, k, v, arrays, out, lse, do)
  b, h, np_, d = dk_h.shape
  hkv = h // st.group
  # Per-q-head partial dK/dV summed over each kv head's group, in fp32.
  dk = dk_h.reshape(b, hkv, st.group, np_, d).sum(axis=2).astype(k.dtype)
  dv = dv_h.reshape(b, hkv, st.group, np_, d).sum(axis=2).astype(v.dtype)
  return dq, dk, dv, jax.tree.map(lambda _: None, arrays)


_sparse_flash.defvjp(_sparse_flash_fwd, _sparse_flash_bwd)


def boltzmann_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockSparseLayout,
    *,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Block-sparse flash attention over the key blocks listed in `layout`.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (Hkv divides H).
    layout: from `sample_kept_blocks` (whole blocks) or
      `block_sparse_layout(sample_kept_keys(...))` (per-key mask inside
      blocks). Its head axis Hs must divide H; its tiling is the kernel's.
    sm_scale: logit scale, default 1/sqrt(D).
    block_sizes: optional; its block_q/block_k must equal the layout's
      (the Triton num_warps/num_stages are taken from it).
    lowering: 'gpu' (Pallas Triton) or 'tpu' (Mosaic); default from platform.
    interpret: run the kernel in Pallas interpret mode (CPU testing).

  Returns:
    [B, H, Q, D] in q.dtype. Differentiable in q, k, v (custom_vjp).
  """
  hkv, group = common.check_qkv(q, k, v)
  b, h, nq, d = q.shape
  n = k.shape[2]
  lowering = lowering or common.default_lowering()
  bq, bk = layout.block_q, layout.block_k
  if block_sizes is None:
    block_sizes = dataclasses.replace(BlockSizes.get_default(lowering), block_q=bq, block_k=bk)
  if (block_sizes.block_q, block_sizes.block_k) != (bq, bk):
    raise ValueError(
        f"block_sizes {block_sizes.block_q}x{block_sizes.block_k} differ from the"
        f" layout's tiling {bq}x{bk}; build the layout with the kernel's block sizes.")
  block_sizes.validate(lowering, interpret)
  if (layout.num_queries, layout.num_keys) != (nq, n):
    raise ValueError(
        f"layout is for {layout.num_queries} queries x {layout.num_keys} keys but"
        f" q has {nq} and k has {n}.")
  hs = layout.block_indices.shape[1]
  if layout.block_indices.shape[0] != b or h % hs:
    raise ValueError(
        f"layout batch/heads {layout.block_indices.shape[:2]} do not fit q {q.shape}.")
  # Triton tiles need power-of-two feature width; zero columns change nothing.
  dp = max(16, common.next_power_of_2(d)) if lowering == "gpu" else d
  scale = common.default_scale(d, sm_scale)
  qt, kb = layout.num_q_tiles, layout.num_k_blocks
  pad = lambda x, length: common.pad_axis(common.pad_axis(x, 3, dp), 2, length)
  st = _Static(
      sm_scale=scale, block_q=bq, block_k=bk, num_keys=n, group=group,
      sel_group=h // hs, has_mask=layout.mask is not None, lowering=lowering,
      interpret=interpret, num_warps=block_sizes.gpu_num_warps(dp),
      num_stages=block_sizes.num_stages)
  arrays = (layout.block_indices, layout.block_counts, layout.q_tile_indices,
            layout.q_tile_counts, layout.mask)
  out = _sparse_flash(st, pad(q, qt * bq), pad(k, kb * bk), pad(v, kb * bk), arrays)
  return out[:, :, :nq, :d]
