"""Pieces shared by the sparse-attention kernels: block sizes, masking, math.

Both kernels in this package (Boltzmann-sampled attention and token-selection
attention) are flash-attention variants that differ only in *which* keys a
query tile visits and *how* the key rows are fetched. The numerically delicate
part -- the online softmax with fp32 accumulation and the way masked entries are
kept out of it -- lives here once, so that the GPU (Triton) and TPU (Mosaic)
lowerings and their backward passes all share a single, tested definition.

Tensor layout everywhere in this package: ``[batch, heads, length, head_dim]``
(BHLD). It keeps one (batch, head) slice contiguous, which is what a kernel
grid over (batch, head, tile) wants, and it is the layout of jax's TPU flash
attention. Grouped-query attention: ``k``/``v`` may have fewer heads than
``q`` as long as they divide it; query head ``h`` reads kv head
``h // (q_heads // kv_heads)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# A large negative *finite* logit for masked entries. Finite so that a row whose
# whole block is masked gives exp(MASK - MASK) = 1 instead of NaN; the masked
# probabilities are then zeroed explicitly with `where`, so the value never
# leaks into a result. (-inf would need special-casing in every max/exp.)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# TPU vregs are (8 sublanes x 128 lanes); per-row statistics (running max,
# normaliser, logsumexp) are stored broadcast across one lane-width so that
# every load/store is a full, aligned vreg (the layout jax's TPU kernels use).
NUM_LANES = 128

Lowering = Literal["gpu", "tpu"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the sparse-attention kernels.

  The sparsity layout is defined on these tiles (a query tile visits a list of
  key blocks), so forward and backward use the same tiles: a different backward
  tiling would need a second layout and would no longer visit the same blocks.

  Attributes:
    block_q: queries per tile. GPU (Triton): a power of two >= 16. TPU: a
      multiple of 8 (128 recommended).
    block_k: keys per block (Boltzmann) or selected tokens per chunk (token
      selection). GPU: a power of two >= 16. TPU: a multiple of 128.
    num_warps: Triton warps per program; None picks 4 for head_dim <= 64 and
      8 otherwise (the heuristic of jax's Triton flash attention).
    num_stages: Triton software-pipelining depth of the key loop.
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    if self.block_q < 1 or self.block_k < 1:
      raise ValueError(f"block sizes must be positive, got {self}")

  @classmethod
  def get_default(cls, lowering: str | None = None) -> "BlockSizes":
    """Defaults per lowering; 'gpu' is also what interpret mode uses on CPU."""
    lowering = lowering or default_lowering()
    if lowering == "tpu":
      return cls(block_q=128, block_k=128)
    return cls(block_q=64, block_k=64, num_stages=3)

  def validate(self, lowering: str, interpret: bool = False) -> None:
    """Raises a one-line error naming the constraint the lowering imposes.

    In interpret mode the TPU (8, 128) alignment is not enforced: the
    interpreter has no vreg layout, and small tiles keep CPU tests fast.
    """
    if lowering == "tpu" and interpret:
      return
    if lowering == "gpu":
      for name in ("block_q", "block_k"):
        b = getattr(self, name)
        if b < 16 or b & (b - 1):
          raise ValueError(
              f"BlockSizes.{name}={b}: the Pallas Triton lowering needs a power"
              " of two >= 16 (tl.arange sizes and tensor-core dot minimum).")
    elif lowering == "tpu":
      if self.block_q % 8:
        raise ValueError(
            f"BlockSizes.block_q={self.block_q}: Mosaic needs a multiple of 8.")
      if self.block_k % NUM_LANES:
        raise ValueError(
            f"BlockSizes.block_k={self.block_k}: Mosaic needs a multiple of 128.")
    else:
      raise ValueError(f"unknown lowering {lowering!r}; use 'gpu' or 'tpu'.")

  def gpu_num_warps(self, head_dim: int) -> int:
    if self.num_warps is not None:
      return self.num_warps
    return 4 if head_dim <= 64 else 8


def default_lowering() -> str:
  """'tpu' on TPU, else 'gpu' (also the CPU interpret-mode default)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, new_size: int, value=0) -> jax.Array:
  """Pads `axis` at the end to `new_size` (no-op when already that size)."""
  extra = new_size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int]:
  """Validates BHLD shapes; returns (kv_heads, group size q_heads // kv_heads)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "q, k, v must be [batch, heads, length, head_dim]; got shapes"
        f" {q.shape}, {k.shape}, {v.shape}.")
  b, h, _, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}.")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(
        f"k/v batch and head_dim must match q: q {q.shape}, k {k.shape}.")
  hkv = k.shape[1]
  if h % hkv:
    raise ValueError(
        f"q heads ({h}) must be a multiple of kv heads ({hkv}) for grouped-query"
        " attention.")
  return hkv, h // hkv


def default_scale(head_dim: int, sm_scale: float | None) -> float:
  return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def gather_heads(q, k, v, sel_heads: int):
  """Regroups heads so one gathered K/V slab serves as many q heads as possible.

  With Hkv kv heads and Hs selection heads (both dividing H), a "gather head"
  g in [0, lcm(Hkv, Hs)) has one kv head and one selection head; the q heads
  sharing both are batched against the same gathered slab.
  Returns (q [B, G', r, Q, D], k [B, G', N, D], v, G', r).
  """
  b, h, nq, d = q.shape
  hkv = k.shape[1]
  hg = math.lcm(hkv, sel_heads)
  k = jnp.repeat(k, hg // hkv, axis=1)
  v = jnp.repeat(v, hg // hkv, axis=1)
  return q.reshape(b, hg, h // hg, nq, d), k, v, hg, h // hg


# ----------------------------------------------------------------------------
# 2-D matmuls spelled the way both Triton and Mosaic lower them.
# ----------------------------------------------------------------------------
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T with fp32 accumulation (q k^T, do v^T)."""
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with fp32 accumulation (p v, ds k)."""
  return lax.dot(a, b, preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a.T @ b with fp32 accumulation (p^T do, ds^T q)."""
  return lax.dot(a.T, b, preferred_element_type=jnp.float32)


def online_softmax_step(
    s: jax.Array,
    valid: jax.Array,
    v: jax.Array,
    m_prev: jax.Array,
    l_prev: jax.Array,
    acc_prev: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of flash attention's online softmax.

  Args:
    s: [bq, bk] fp32 scaled logits.
    valid: [bq, bk] bool; False entries get probability exactly 0.
    v: [bk, d] values (input dtype; p is cast to it for the tensor-core dot).
    m_prev, l_prev: [bq, 1] running max and normaliser.
    acc_prev: [bq, d] fp32 unnormalised output.

  Returns:
    Updated (m, l, acc). A row with no valid entry so far keeps l = 0 and
    acc = 0, which `finalize` turns into a zero output.
  """
  s = jnp.where(valid, s, MASK_VALUE)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_next)
  p = jnp.where(valid, jnp.exp(s - m_next), 0.0)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_next = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
  return m_next, l_next, acc_next


def finalize(m: jax.Array, l: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (acc / l, logsumexp) with empty rows mapped to (0, +big).

  The logsumexp of an empty row is set huge so that the backward pass's
  exp(s - lse) is exactly 0 for it.
  """
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  out = acc / l_safe
  lse = jnp.where(empty, -MASK_VALUE, m + jnp.log(l_safe))
  return out, lse


def backward_block(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    valid: jax.Array,
    sm_scale: float,
) -> tuple[jax.Array, jax.Array]:
  """Recomputes one tile's probabilities and their logit gradients.

  Args:
    q [bq, d], k [bk, d], v [bk, d], do [bq, d]: tile operands.
    lse, delta: [bq, 1] fp32 forward logsumexp and rowsum(o * do).
    valid: [bq, bk] bool.

  Returns:
    (p, ds): [bq, bk] fp32 probabilities and d(loss)/d(logits) *before* the
    softmax scale, i.e. dq = sm_scale * ds @ k and dk = sm_scale * ds^T @ q.
  """
  s = dot_nt(q, k) * sm_scale
  p = jnp.where(valid, jnp.exp(s - lse), 0.0)
  dp = dot_nt(do, v)
  ds = p * (dp - delta)
  return p, ds
