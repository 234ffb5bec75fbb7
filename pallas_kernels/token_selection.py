"""Text-guided token-selection attention (SemCLIP): kernel, reference, fallback.

SemCLIP scores every visual token by its relevance to the text query (e.g. the
cosine similarity of the text embedding and the token embedding) and keeps the
top-k tokens, or those above a threshold within a budget. Queries then attend
only to the selected tokens. The selection is shared by all queries of an
example (and optionally differs per head), so the kernel is flash attention over
a *gathered* key set:

* `token_selection_attention` -- the Pallas kernel. The selected positions are
  passed to the kernel and the K/V rows are gathered *inside* it, chunk by
  chunk, so no gathered copy of K/V is ever written to memory. 'gpu' (Triton):
  a vector of block_k positions is loaded and used as a pointer gather
  (`k_ref[rows, :]`). 'tpu' (Mosaic): the positions are scalar-prefetched into
  SMEM and each row is DMA'd from HBM into a double-buffered VMEM chunk, the
  next chunk's DMAs overlapping the current chunk's matmuls (the paged-attention
  pattern with one-row pages). `custom_vjp`: dq walks the same chunks; dk/dv are
  computed per selected row (in selection order) and scatter-added to their
  positions outside the kernel.
* `token_selection_attention_reference` -- dense attention over all N keys
  with a mask of the selected ones (the definition).
* `token_selection_attention_xla` -- gathers the selected rows once per
  (batch, head) ([K, D], not per query) and runs dense attention over them.

Selections are (indices, counts): indices int32 [B, Hs, K] of *distinct*
positions (a repeated position would be weighted twice by the kernel and the
fallback, once by the reference), counts int32 [B, Hs] of valid entries
(default K). An example with nothing selected gets a zero output.
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
from pallas_kernels.common import BlockSizes


# ============================================================================
# Selection (plain XLA, outside the kernel).
# ============================================================================
def cosine_relevance(query_embedding: jax.Array, token_embeddings: jax.Array) -> jax.Array:
  """SemCLIP relevance: cosine(text query, visual token).

  Args:
    query_embedding: [B, E] (or [B, Hs, E] for per-head selections).
    token_embeddings: [B, N, E].
  Returns:
    [B, N] (or [B, Hs, N]) fp32 similarities.
  """
  qn = query_embedding / (jnp.linalg.norm(query_embedding, axis=-1, keepdims=True) + 1e-6)
  tn = token_embeddings / (jnp.linalg.norm(token_embeddings, axis=-1, keepdims=True) + 1e-6)
  if qn.ndim == 2:
    return jnp.einsum("be,bne->bn", qn, tn).astype(jnp.float32)
  return jnp.einsum("bhe,bne->bhn", qn, tn).astype(jnp.float32)


def _as_3d(relevance: jax.Array) -> jax.Array:
  if relevance.ndim == 2:
    return relevance[:, None]
  if relevance.ndim == 3:
    return relevance
  raise ValueError(
      f"relevance must be [batch, tokens] or [batch, heads, tokens], got {relevance.shape}.")


def select_top_k(relevance: jax.Array, num_selected: int) -> tuple[jax.Array, jax.Array]:
  """Top-k tokens per example (and head), returned in ascending position order.

  Ascending order keeps the kernel's row gathers as local in memory as the
  selection allows. Returns (indices int32 [B, Hs, k], counts int32 [B, Hs]).
  """
  rel = _as_3d(lax.stop_gradient(relevance))
  if not 1 <= num_selected <= rel.shape[-1]:
    raise ValueError(f"num_selected={num_selected} must be in [1, {rel.shape[-1]}].")
  _, idx = lax.top_k(rel, num_selected)
  counts = jnp.full(rel.shape[:2], num_selected, jnp.int32)
  return jnp.sort(idx, axis=-1).astype(jnp.int32), counts


def select_by_budget(
    relevance: jax.Array, *, max_tokens: int, threshold: float, min_tokens: int = 1
) -> tuple[jax.Array, jax.Array]:
  """Tokens with relevance >= threshold, at most max_tokens, at least min_tokens.

  The token count varies per example; the static width max_tokens is the
  budget. Returns (indices [B, Hs, max_tokens] ascending then 0-padded,
  counts [B, Hs]).
  """
  rel = _as_3d(lax.stop_gradient(relevance))
  n = rel.shape[-1]
  vals, idx = lax.top_k(rel, max_tokens)
  rank = jnp.arange(max_tokens)
  keep = (vals >= threshold) | (rank < min_tokens)
  counts = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  ordered = jnp.sort(jnp.where(keep, idx, n + idx), axis=-1)
  return jnp.where(rank < counts[..., None], ordered, 0).astype(jnp.int32), counts


def _check_selection(indices, counts, q, k):
  if indices.ndim != 3 or indices.shape[0] != q.shape[0] or q.shape[1] % indices.shape[1]:
    raise ValueError(
        f"indices must be [batch, heads dividing {q.shape[1]}, k], got {indices.shape}.")
  if counts is None:
    counts = jnp.full(indices.shape[:2], indices.shape[2], jnp.int32)
  if counts.shape != indices.shape[:2]:
    raise ValueError(f"counts shape {counts.shape} must be {indices.shape[:2]}.")
  return indices.astype(jnp.int32), counts.astype(jnp.int32)


# ============================================================================
# Reference twin and XLA fallback.
# ============================================================================
def token_selection_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    counts: jax.Array | None = None,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
  """Dense fp32 attention over all N keys, masked to the selected ones."""
  _, group = common.check_qkv(q, k, v)
  indices, counts = _check_selection(indices, counts, q, k)
  b, h, nq, d = q.shape
  n = k.shape[2]
  scale = common.default_scale(d, sm_scale)
  valid = jnp.arange(indices.shape[-1]) < counts[..., None]
  sel = jnp.zeros((b, indices.shape[1], n), jnp.bool_)
  sel = sel.at[jnp.arange(b)[:, None, None], jnp.arange(indices.shape[1])[None, :, None],
               jnp.where(valid, indices, n)].set(True, mode="drop")
  sel = jnp.repeat(sel, h // indices.shape[1], axis=1)[:, :, None, :]  # [B, H, 1, N]
  kf = jnp.repeat(k, group, axis=1).astype(jnp.float32)
  vf = jnp.repeat(v, group, axis=1).astype(jnp.float32)
  s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), kf,
                 precision=lax.Precision.HIGHEST) * scale
  s = jnp.where(sel, s, -jnp.inf)
  p = jnp.where(jnp.any(sel, -1, keepdims=True), jax.nn.softmax(s, axis=-1), 0.0)
  o = jnp.einsum("bhqk,bhkd->bhqd", p, vf, precision=lax.Precision.HIGHEST)
  return o.astype(q.dtype)


def token_selection_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    counts: jax.Array | None = None,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
  """Gathers the selected rows once per (batch, gather head), then dense attention.

  Memory: the gathered [K, D] slab per head is shared by all queries, and the
  [Q, K] scores are smaller than the [Q, N] dense ones.
  """
  common.check_qkv(q, k, v)
  indices, counts = _check_selection(indices, counts, q, k)
  b, h, nq, d = q.shape
  scale = common.default_scale(d, sm_scale)
  qg, kg, vg, hg, r = common.gather_heads(q, k, v, indices.shape[1])
  idx = jnp.repeat(indices, hg // indices.shape[1], axis=1)
  cnt = jnp.repeat(counts, hg // counts.shape[1], axis=1)
  take = jax.vmap(jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0, mode="clip")))
  ks, vs = take(kg, idx), take(vg, idx)  # [B, G', K, D]
  s = jnp.einsum("bgrqd,bgkd->bgrqk", qg, ks, preferred_element_type=jnp.float32) * scale
  valid = (jnp.arange(idx.shape[-1]) < cnt[..., None])[:, :, None, None, :]
  s = jnp.where(valid, s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # cancels out of o
  p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bgrqk,bgkd->bgrqd", p.astype(vs.dtype), vs,
                 preferred_element_type=jnp.float32)
  return o.reshape(b, h, nq, d).astype(q.dtype)


# ============================================================================
# Pallas kernels.
# ============================================================================
@dataclasses.dataclass(frozen=True)
class _Static:
  sm_scale: float
  block_q: int
  block_k: int
  group: int
  sel_group: int
  lowering: str
  interpret: bool
  num_warps: int
  num_stages: int


def _pos_valid(start, shape: tuple[int, int], count):
  """[block_q, block_k] bool: chunk positions below the selection count (2-D
  iota at full tile shape, which Triton and Mosaic both lower directly)."""
  return start + lax.broadcasted_iota(jnp.int32, shape, 1) < count


# ---------------------------------------------------------------- GPU (Triton)
def _gpu_fwd_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, o_ref, lse_ref, *, st: _Static):
  """One program per (query tile, batch, head); gathers block_k rows per step."""
  bq, d = q_ref.shape
  bk = st.block_k
  q = q_ref[...]
  count = cnt_ref[0]

  def body(c, carry):
    m, l, acc = carry
    start = pl.multiple_of(c * bk, bk)
    rows = idx_ref[pl.ds(start, bk)]
    kblk = k_ref[rows, :]
    vblk = v_ref[rows, :]
    s = common.dot_nt(q, kblk) * st.sm_scale
    valid = _pos_valid(start, (bq, bk), count)
    return common.online_softmax_step(s, valid, vblk, m, l, acc)

  init = (jnp.full((bq, 1), common.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, d), jnp.float32))
  m, l, acc = lax.fori_loop(0, (count + bk - 1) // bk, body, init)
  out, lse = common.finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(bq)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref,
                   dq_ref, *, st: _Static):
  bq, d = q_ref.shape
  bk = st.block_k
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  count = cnt_ref[0]

  def body(c, dq):
    start = pl.multiple_of(c * bk, bk)
    rows = idx_ref[pl.ds(start, bk)]
    kblk = k_ref[rows, :]
    vblk = v_ref[rows, :]
    valid = _pos_valid(start, (bq, bk), count)
    _, ds = common.backward_block(q, kblk, vblk, do, lse, delta, valid, st.sm_scale)
    return dq + common.dot_nn(ds.astype(kblk.dtype), kblk)

  dq = lax.fori_loop(0, (count + bk - 1) // bk, body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref,
                    dk_ref, dv_ref, *, st: _Static, q_tiles: int):
  """One program per (selection chunk, batch, q head); loops over all q tiles."""
  bk, d = dk_ref.shape
  bq = st.block_q
  start = pl.program_id(0) * bk
  rows = idx_ref[...]
  kblk = k_ref[rows, :]
  vblk = v_ref[rows, :]
  valid = _pos_valid(start, (bq, bk), cnt_ref[0])

  def body(t, carry):
    dk, dv = carry
    qs = pl.multiple_of(t * bq, bq)
    q = q_ref[pl.ds(qs, bq), :]
    do = do_ref[pl.ds(qs, bq), :]
    lse = lse_ref[pl.ds(qs, bq)][:, None]
    delta = delta_ref[pl.ds(qs, bq)][:, None]
    p, ds = common.backward_block(q, kblk, vblk, do, lse, delta, valid, st.sm_scale)
    return (dk + common.dot_tn(ds.astype(q.dtype), q),
            dv + common.dot_tn(p.astype(do.dtype), do))

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(0, q_tiles, body, (zeros, zeros))
  dk_ref[...] = dk * st.sm_scale
  dv_ref[...] = dv


def _gpu_forward(st: _Static, q, k, v, idx, cnt):
  b, h, qp, d = q.shape
  n = k.shape[2]
  kp = idx.shape[-1]
  bq = st.block_q
  g, r = st.group, st.sel_group
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, st=st),
      grid=(qp // bq, b, h),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0)),
          pl.BlockSpec((None, None, n, d), lambda i, bb, hh: (bb, hh // g, 0, 0)),
          pl.BlockSpec((None, None, n, d), lambda i, bb, hh: (bb, hh // g, 0, 0)),
          pl.BlockSpec((None, None, kp), lambda i, bb, hh: (bb, hh // r, 0)),
          pl.BlockSpec((None, None, 1), lambda i, bb, hh: (bb, hh // r, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, qp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
      interpret=st.interpret,
      name="token_selection_attention_fwd",
  )(q, k, v, idx, cnt[..., None])


def _gpu_backward(st: _Static, q, k, v, idx, cnt, out, lse, do, delta):
  b, h, qp, d = q.shape
  n = k.shape[2]
  kp = idx.shape[-1]
  bq, bk = st.block_q, st.block_k
  g, r = st.group, st.sel_group
  params = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)
  tile = pl.BlockSpec((None, None, bq, d), lambda i, bb, hh: (bb, hh, i, 0))
  row = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
  kv_full = pl.BlockSpec((None, None, n, d), lambda i, bb, hh: (bb, hh // g, 0, 0))
  cnt_spec = pl.BlockSpec((None, None, 1), lambda i, bb, hh: (bb, hh // r, 0))
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, st=st),
      grid=(qp // bq, b, h),
      in_specs=[tile, kv_full, kv_full, tile, row, row,
                pl.BlockSpec((None, None, kp), lambda i, bb, hh: (bb, hh // r, 0)), cnt_spec],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=st.interpret,
      name="token_selection_attention_dq",
  )(q, k, v, do, lse, delta, idx, cnt[..., None])
  q_full = pl.BlockSpec((None, None, qp, d), lambda c, bb, hh: (bb, hh, 0, 0))
  row_full = pl.BlockSpec((None, None, qp), lambda c, bb, hh: (bb, hh, 0))
  out_blk = pl.BlockSpec((None, None, bk, d), lambda c, bb, hh: (bb, hh, c, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, st=st, q_tiles=qp // bq),
      grid=(kp // bk, b, h),
      in_specs=[q_full, kv_full, kv_full, q_full, row_full, row_full,
                pl.BlockSpec((None, None, bk), lambda c, bb, hh: (bb, hh // r, c)), cnt_spec],
      out_specs=[out_blk, out_blk],
      out_shape=[jax.ShapeDtypeStruct((b, h, kp, d), jnp.float32)] * 2,
      compiler_params=params,
      interpret=st.interpret,
      name="token_selection_attention_dkv",
  )(q, k, v, do, lse, delta, idx, cnt[..., None])
  return dq, dk, dv


# ---------------------------------------------------------------- TPU (Mosaic)
def _tpu_interpret(st: _Static):
  return pltpu.InterpretParams() if st.interpret else False


class _RowGather:
  """DMAs block_k selected rows of K and V from HBM into a VMEM chunk slot.

  Each row is its own DMA (a one-row page); all rows of a slot signal that
  slot's semaphore, and waiting replays the same descriptors so the byte
  counts match.
  """

  def __init__(self, idx_ref, base, k_hbm, v_hbm, kbuf, vbuf, sems, block_k: int):
    self.idx_ref, self.base = idx_ref, base
    self.k_hbm, self.v_hbm = k_hbm, v_hbm
    self.kbuf, self.vbuf, self.sems = kbuf, vbuf, sems
    self.block_k = block_k

  def _copies(self, chunk, slot, row):
    tok = self.idx_ref[self.base + chunk * self.block_k + row]
    ck = pltpu.make_async_copy(self.k_hbm.at[pl.ds(tok, 1)],
                               self.kbuf.at[slot, pl.ds(row, 1)], self.sems.at[0, slot])
    cv = pltpu.make_async_copy(self.v_hbm.at[pl.ds(tok, 1)],
                               self.vbuf.at[slot, pl.ds(row, 1)], self.sems.at[1, slot])
    return ck, cv

  def start(self, chunk, slot):
    def row(rr, carry):
      for c in self._copies(chunk, slot, rr):
        c.start()
      return carry
    lax.fori_loop(0, self.block_k, row, 0)

  def wait(self, chunk, slot):
    def row(rr, carry):
      for c in self._copies(chunk, slot, rr):
        c.wait()
      return carry
    lax.fori_loop(0, self.block_k, row, 0)


def _tpu_chunk_loop(gather: _RowGather, count, on_chunk):
  """Runs on_chunk(c, k [bk, D], v [bk, D]) over the selection, double-buffered."""
  bk = gather.block_k
  n_chunks = (count + bk - 1) // bk

  @pl.when(n_chunks > 0)
  def _prime():
    gather.start(0, 0)

  def body(c, carry):
    slot = c % 2

    @pl.when(c + 1 < n_chunks)
    def _prefetch():
      gather.start(c + 1, 1 - slot)

    gather.wait(c, slot)
    on_chunk(c, gather.kbuf[slot], gather.vbuf[slot])
    return carry

  lax.fori_loop(0, n_chunks, body, 0)


def _tpu_fwd_kernel(idx_ref, cnt_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref,
                    kbuf, vbuf, sems, m_scr, l_scr, acc_scr, *, st: _Static,
                    heads_sel: int, kp: int):
  b, h = pl.program_id(0), pl.program_id(1)
  sel = b * heads_sel + h // st.sel_group
  count = cnt_ref[sel]
  bq, bk = st.block_q, st.block_k
  hk = h // st.group
  gather = _RowGather(idx_ref, sel * kp, k_hbm.at[b, hk], v_hbm.at[b, hk],
                      kbuf, vbuf, sems, bk)
  m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
  l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
  acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
  q = q_ref[...]

  def on_chunk(c, kblk, vblk):
    s = common.dot_nt(q, kblk) * st.sm_scale
    valid = _pos_valid(c * bk, (bq, bk), count)
    m, l, acc = common.online_softmax_step(
        s, valid, vblk, m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  _tpu_chunk_loop(gather, count, on_chunk)
  out, lse = common.finalize(m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _tpu_dq_kernel(idx_ref, cnt_ref, q_ref, k_hbm, v_hbm, do_ref, lse_ref, delta_ref,
                   dq_ref, kbuf, vbuf, sems, dq_scr, *, st: _Static, heads_sel: int, kp: int):
  b, h = pl.program_id(0), pl.program_id(1)
  sel = b * heads_sel + h // st.sel_group
  count = cnt_ref[sel]
  bq, bk = st.block_q, st.block_k
  hk = h // st.group
  gather = _RowGather(idx_ref, sel * kp, k_hbm.at[b, hk], v_hbm.at[b, hk],
                      kbuf, vbuf, sems, bk)
  dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, :1], delta_ref[...][:, :1]

  def on_chunk(c, kblk, vblk):
    valid = _pos_valid(c * bk, (bq, bk), count)
    _, ds = common.backward_block(q, kblk, vblk, do, lse, delta, valid, st.sm_scale)
    dq_scr[...] += common.dot_nn(ds.astype(kblk.dtype), kblk)

  _tpu_chunk_loop(gather, count, on_chunk)
  dq_ref[...] = (dq_scr[...] * st.sm_scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(idx_ref, cnt_ref, q_ref, k_hbm, v_hbm, do_ref, lse_ref, delta_ref,
                    dk_ref, dv_ref, kbuf, vbuf, sems, dk_scr, dv_scr, *, st: _Static,
                    heads_sel: int, kp: int, q_tiles: int):
  """Grid (b, h, chunk, q tile): the chunk's rows are gathered once at t == 0."""
  b, h, c, t = (pl.program_id(a) for a in range(4))
  sel = b * heads_sel + h // st.sel_group
  count = cnt_ref[sel]
  bq, bk = st.block_q, st.block_k
  hk = h // st.group
  live = c * bk < count
  gather = _RowGather(idx_ref, sel * kp, k_hbm.at[b, hk], v_hbm.at[b, hk],
                      kbuf, vbuf, sems, bk)

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(live)
    def _fetch():
      gather.start(c, 0)
      gather.wait(c, 0)

  @pl.when(live)
  def _step():
    valid = _pos_valid(c * bk, (bq, bk), count)
    q, do = q_ref[...], do_ref[...]
    p, ds = common.backward_block(q, kbuf[0], vbuf[0], do, lse_ref[...][:, :1],
                                  delta_ref[...][:, :1], valid, st.sm_scale)
    dv_scr[...] += common.dot_tn(p.astype(do.dtype), do)
    dk_scr[...] += common.dot_tn(ds.astype(q.dtype), q)

  @pl.when(t == q_tiles - 1)
  def _finish():
    dk_ref[...] = dk_scr[...] * st.sm_scale
    dv_ref[...] = dv_scr[...]


def _tpu_scratch(st: _Static, d: int, dtype, slots: int):
  return [pltpu.VMEM((slots, st.block_k, d), dtype),
          pltpu.VMEM((slots, st.block_k, d), dtype),
          pltpu.SemaphoreType.DMA((2, slots))]


def _tpu_forward(st: _Static, q, k, v, idx, cnt):
  b, h, qp, d = q.shape
  hs, kp = idx.shape[1], idx.shape[2]
  bq = st.block_q
  q_map = lambda bb, hh, i, *_: (bb, hh, i, 0)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out, lse = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, st=st, heads_sel=hs, kp=kp),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, qp // bq),
          in_specs=[pl.BlockSpec((None, None, bq, d), q_map), any_spec, any_spec],
          out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                     pl.BlockSpec((None, None, bq, common.NUM_LANES), q_map)],
          scratch_shapes=_tpu_scratch(st, d, k.dtype, 2) + [
              pltpu.VMEM((bq, common.NUM_LANES), jnp.float32),
              pltpu.VMEM((bq, common.NUM_LANES), jnp.float32),
              pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, qp, common.NUM_LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_tpu_interpret(st),
      name="token_selection_attention_fwd",
  )(idx.reshape(-1), cnt.reshape(-1), q, k, v)
  return out, lse[..., 0]


def _tpu_backward(st: _Static, q, k, v, idx, cnt, out, lse, do, delta):
  b, h, qp, d = q.shape
  hs, kp = idx.shape[1], idx.shape[2]
  bq, bk = st.block_q, st.block_k
  lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (common.NUM_LANES,))
  lse_l, delta_l = lanes(lse), lanes(delta)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  q_map = lambda bb, hh, i, *_: (bb, hh, i, 0)
  tile = pl.BlockSpec((None, None, bq, d), q_map)
  row = pl.BlockSpec((None, None, bq, common.NUM_LANES), q_map)
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, st=st, heads_sel=hs, kp=kp),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, qp // bq),
          in_specs=[tile, any_spec, any_spec, tile, row, row],
          out_specs=tile,
          scratch_shapes=_tpu_scratch(st, d, k.dtype, 2) + [pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_tpu_interpret(st),
      name="token_selection_attention_dq",
  )(idx.reshape(-1), cnt.reshape(-1), q, k, v, do, lse_l, delta_l)
  t_map = lambda bb, hh, c, t, *_: (bb, hh, t, 0)
  out_map = lambda bb, hh, c, t, *_: (bb, hh, c, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, st=st, heads_sel=hs, kp=kp, q_tiles=qp // bq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, kp // bk, qp // bq),
          in_specs=[pl.BlockSpec((None, None, bq, d), t_map), any_spec, any_spec,
                    pl.BlockSpec((None, None, bq, d), t_map),
                    pl.BlockSpec((None, None, bq, common.NUM_LANES), t_map),
                    pl.BlockSpec((None, None, bq, common.NUM_LANES), t_map)],
          out_specs=[pl.BlockSpec((None, None, bk, d), out_map)] * 2,
          scratch_shapes=_tpu_scratch(st, d, k.dtype, 1) + [
              pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, kp, d), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(st),
      name="token_selection_attention_dkv",
  )(idx.reshape(-1), cnt.reshape(-1), q, k, v, do, lse_l, delta_l)
  return dq, dk, dv


# ------------------------------------------------------------ custom_vjp glue
def _forward(st: _Static, q, k, v, idx, cnt):
  if st.lowering == "tpu":
    return _tpu_forward(st, q, k, v, idx, cnt)
  return _gpu_forward(st, q, k, v, idx, cnt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selected_flash(st: _Static, q, k, v, idx, cnt):
  return _forward(st, q, k, v, idx, cnt)[0]


def _selected_flash_fwd(st: _Static, q, k, v, idx, cnt):
  out, lse = _forward(st, q, k, v, idx, cnt)
  return out, (q, k, v, idx, cnt, out, lse)


def _selected_flash_bwd(st: _Static, res, do):
  q, k, v, idx, cnt, out, lse = res
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  backward = _tpu_backward if st.lowering == "tpu" else _gpu_backward
  dq, dk_sel, dv_sel = backward(st, q, k, v, idx, cnt, out, lse, do, delta)
  # dK/dV rows come back in selection order, per q head; scatter-add them to
  # their key positions in the owning kv head (duplicates would accumulate).
  b, h, kp, d = dk_sel.shape
  rows = jnp.repeat(idx, st.sel_group, axis=1)  # [B, H, Kp]
  bi = jnp.arange(b)[:, None, None]
  hi = (jnp.arange(h) // st.group)[None, :, None]
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk = zeros.at[bi, hi, rows].add(dk_sel).astype(k.dtype)
  dv = zeros.at[bi, hi, rows].add(dv_sel).astype(v.dtype)
  return dq, dk, dv, None, None


_selected_flash.defvjp(_selected_flash_fwd, _selected_flash_bwd)


def token_selection_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    counts: jax.Array | None = None,
    *,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Attention of every query over the selected tokens only (Pallas).

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (Hkv divides H).
    indices: int32 [B, Hs, K] distinct selected positions (Hs divides H), e.g.
      from `select_top_k` / `select_by_budget`.
    counts: int32 [B, Hs] valid entries per selection (default K).
    block_sizes: block_q = queries per tile, block_k = selected rows gathered
      per step.
    lowering: 'gpu' | 'tpu'; default from the platform.
    interpret: Pallas interpret mode (CPU testing).
  Returns:
    [B, H, Q, D] in q.dtype; differentiable in q, k, v.
  """
  hkv, group = common.check_qkv(q, k, v)
  indices, counts = _check_selection(indices, counts, q, k)
  b, h, nq, d = q.shape
  lowering = lowering or common.default_lowering()
  block_sizes = block_sizes or BlockSizes.get_default(lowering)
  block_sizes.validate(lowering, interpret)
  bq, bk = block_sizes.block_q, block_sizes.block_k
  dp = max(16, common.next_power_of_2(d)) if lowering == "gpu" else d
  scale = common.default_scale(d, sm_scale)
  kp = common.round_up(indices.shape[-1], bk)
  qp = common.round_up(nq, bq)
  # Entries past the count point at row 0: always a legal address for the
  # in-kernel gather/DMA, and masked out of the softmax.
  pos = jnp.arange(indices.shape[-1])
  idx = jnp.where(pos < counts[..., None], jnp.clip(indices, 0, k.shape[2] - 1), 0)
  idx = common.pad_axis(idx, 2, kp)
  st = _Static(sm_scale=scale, block_q=bq, block_k=bk, group=group,
               sel_group=h // indices.shape[1], lowering=lowering, interpret=interpret,
               num_warps=block_sizes.gpu_num_warps(dp), num_stages=block_sizes.num_stages)
  pad_d = lambda x: common.pad_axis(x, 3, dp)
  out = _selected_flash(st, common.pad_axis(pad_d(q), 2, qp), pad_d(k), pad_d(v), idx, counts)
  return out[:, :, :nq, :d]
