"""Config-driven entry points for the two sparse attentions (BoltzFormer, SemCLIP).

Models call `boltzmann_attend` / `token_selection_attend` (or
`boltzmann_attend_mask` with a keep mask they sampled themselves); the backend
is a config choice, never a code change. Each attention has a
`mlx_med.core.attention.BackendRegistry` (`BOLTZMANN_BACKENDS`,
`TOKEN_SELECTION_BACKENDS`, the same mechanism as the decoder's backends) with
these entries:

  'reference'         plain-jnp dense masked attention (the kernels' twin)
  'xla'               memory-bounded XLA fallback (block gather / query-chunked
                      gather / dense, picked from the sample's static bounds)
  'pallas'            the Pallas kernels, Triton lowering on GPU, Mosaic on TPU
  'pallas_interpret'  the kernels in interpret mode (CPU tests; slow)
  'auto'              'pallas' on GPU/TPU, 'xla' on CPU (resolved by the registry)

Sampling happens here, once, before dispatch, with the same `jax.random` code
for every backend, so a given rng gives the same kept keys -- and the same
output up to float error -- whichever backend runs.

Layout: the kernels are [batch, heads, length, head_dim] ('BHLD', native). The
decoder in `mlx_med.core.attention` uses [batch, length, heads, head_dim];
pass layout='BLHD' to use that convention (two transposes each way).
Grouped-query attention: k/v heads must divide q heads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mlx_med.core.attention import BackendRegistry
from pallas_kernels import boltzmann_attention as _boltz
from pallas_kernels import boltzmann_sampling as _sampling
from pallas_kernels import common as _common
from pallas_kernels import token_selection as _tokens
from pallas_kernels.common import BlockSizes

_AUTO = {"cpu": "xla", "gpu": "pallas", "tpu": "pallas"}
# fn(q, k, v, sample, *, sm_scale, block_sizes, lowering) with q/k/v in BHLD and
# `sample` a KeptKeys (per-key granularity) or BlockSparseLayout (per block).
BOLTZMANN_BACKENDS = BackendRegistry("sparse attention", auto=_AUTO)
# fn(q, k, v, indices, counts, *, sm_scale, block_sizes, lowering).
TOKEN_SELECTION_BACKENDS = BackendRegistry("sparse attention", auto=_AUTO)
GRANULARITIES = ("key", "block")
LAYOUTS = ("BHLD", "BLHD")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  """Everything a model needs to pick and parameterise a sparse attention.

  Attributes:
    backend: one of BACKENDS.
    granularity: Boltzmann sampling per 'key' (exact BoltzFormer semantics) or
      per 'block' (hardware-aligned; see pallas_kernels.boltzmann_sampling).
    sample_ratio: Boltzmann draws per query as a fraction of the keys.
    t0: base temperature; layer l uses t0 / (2 + l).
    num_selected: token selection: top-k (or the budget with a threshold).
    threshold: token selection: keep relevance >= threshold within the budget.
    block_q, block_k: kernel tiles (None = per-platform defaults).
    lowering: force 'gpu' or 'tpu' lowering (None = platform; interpret mode
      on CPU uses 'gpu').
    layout: 'BHLD' or 'BLHD' for q, k, v and the output.
  """

  backend: str = "auto"
  granularity: str = "key"
  sample_ratio: float = 0.1
  t0: float = 1.0
  num_selected: int | None = None
  threshold: float | None = None
  block_q: int | None = None
  block_k: int | None = None
  lowering: str | None = None
  layout: str = "BHLD"

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"sparse attention backend={self.backend!r}; choose one of {BACKENDS}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r}; choose one of {GRANULARITIES}.")
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout={self.layout!r}; choose one of {LAYOUTS}.")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> SparseAttentionConfig:
    """From an ml_collections.ConfigDict (or dict); an unknown key is an error."""
    items = dict(config.items()) if hasattr(config, "items") else dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ValueError(
          f"unknown sparse-attention config key(s) {unknown}; known: {sorted(known)}.")
    return cls(**items)

  def block_sizes(self) -> BlockSizes | None:
    if self.block_q is None and self.block_k is None:
      return None
    default = BlockSizes.get_default(self.lowering)
    return dataclasses.replace(default, block_q=self.block_q or default.block_q,
                               block_k=self.block_k or default.block_k)


def resolve_backend(backend: str) -> str:
  """'auto' -> 'pallas' on GPU/TPU and 'xla' on CPU; unknown names are an error."""
  return BOLTZMANN_BACKENDS.resolve(backend)


def _to_bhld(layout: str, *xs):
  if layout == "BHLD":
    return xs
  if layout == "BLHD":
    return tuple(jnp.swapaxes(x, 1, 2) for x in xs)
  raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}.")


def _from_bhld(layout: str, x):
  return x if layout == "BHLD" else jnp.swapaxes(x, 1, 2)


def _kernel_settings(interpret: bool, block_sizes: BlockSizes | None, lowering: str | None):
  lowering = lowering or ("gpu" if interpret else _common.default_lowering())
  return lowering, block_sizes or BlockSizes.get_default(lowering)


# ------------------------------------------------------------ Boltzmann backends
@BOLTZMANN_BACKENDS.register("reference", needs_key_mask=lambda n_keys, draws: True)
def _boltzmann_reference(q, k, v, sample, *, sm_scale, block_sizes, lowering):
  del block_sizes, lowering
  mask = sample.to_mask() if isinstance(sample, _sampling.KeptKeys) else sample.to_dense_mask()
  return _boltz.boltzmann_attention_reference(q, k, v, mask, sm_scale=sm_scale)


# The XLA fallback's pure-gather path (tiny ratios) never reads the dense mask,
# so the sampler need not build it then.
@BOLTZMANN_BACKENDS.register("xla", needs_key_mask=_boltz.xla_needs_mask)
def _boltzmann_xla(q, k, v, sample, *, sm_scale, block_sizes, lowering):
  del block_sizes, lowering
  return _boltz.boltzmann_attention_xla(q, k, v, sample, sm_scale=sm_scale)


def _boltzmann_pallas(q, k, v, sample, *, sm_scale, block_sizes, lowering, interpret):
  lowering, bsz = _kernel_settings(interpret, block_sizes, lowering)
  if isinstance(sample, _sampling.KeptKeys):
    sample = _sampling.block_sparse_layout(sample, block_q=bsz.block_q, block_k=bsz.block_k)
  return _boltz.boltzmann_attention(q, k, v, sample, sm_scale=sm_scale, block_sizes=bsz,
                                    lowering=lowering, interpret=interpret)


BOLTZMANN_BACKENDS.register("pallas", needs_key_mask=lambda n_keys, draws: True)(
    functools.partial(_boltzmann_pallas, interpret=False))
BOLTZMANN_BACKENDS.register("pallas_interpret", needs_key_mask=lambda n_keys, draws: True)(
    functools.partial(_boltzmann_pallas, interpret=True))


# ------------------------------------------------------ token-selection backends
@TOKEN_SELECTION_BACKENDS.register("reference")
def _tokens_reference(q, k, v, indices, counts, *, sm_scale, block_sizes, lowering):
  del block_sizes, lowering
  return _tokens.token_selection_attention_reference(q, k, v, indices, counts, sm_scale=sm_scale)


@TOKEN_SELECTION_BACKENDS.register("xla")
def _tokens_xla(q, k, v, indices, counts, *, sm_scale, block_sizes, lowering):
  del block_sizes, lowering
  return _tokens.token_selection_attention_xla(q, k, v, indices, counts, sm_scale=sm_scale)


def _tokens_pallas(q, k, v, indices, counts, *, sm_scale, block_sizes, lowering, interpret):
  lowering, bsz = _kernel_settings(interpret, block_sizes, lowering)
  return _tokens.token_selection_attention(q, k, v, indices, counts, sm_scale=sm_scale, block_sizes=bsz,
                                           lowering=lowering, interpret=interpret)


TOKEN_SELECTION_BACKENDS.register("pallas")(functools.partial(_tokens_pallas, interpret=False))
TOKEN_SELECTION_BACKENDS.register("pallas_interpret")(functools.partial(_tokens_pallas, interpret=True))

BACKENDS = BOLTZMANN_BACKENDS.choices()
assert BACKENDS == TOKEN_SELECTION_BACKENDS.choices()


def boltzmann_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scores: jax.Array,
    *,
    rng: jax.Array,
    temperature: float | jax.Array | None = None,
    layer: int | None = None,
    t0: float = 1.0,
    sample_ratio: float = 0.1,
    granularity: str = "key",
    backend: str = "auto",
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    sm_scale: float | None = None,
    layout: str = "BHLD",
) -> jax.Array:
  """BoltzFormer attention: sample kept keys from softmax(scores / T), attend to them.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (or BLHD with layout='BLHD').
    scores: [B, Q, N] (one sample for all heads, as BoltzFormer) or
      [B, Hs, Q, N]; not differentiated.
    rng: PRNG key for the draws.
    temperature: T; or give `layer` for the annealed T = t0 / (2 + layer).
    sample_ratio: n = ceil(sample_ratio * N) draws (per key block for
      granularity='block').
    granularity: 'key' (exact semantics) or 'block' (hardware-aligned).
    backend: see module docstring.
  Returns:
    Attention output shaped like q.
  """
  if (temperature is None) == (layer is None):
    raise ValueError("give exactly one of temperature= or layer= (T = t0 / (2 + layer)).")
  if temperature is None:
    temperature = _sampling.boltzmann_temperature(layer, t0)
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}; choose one of {GRANULARITIES}.")
  q, k, v = _to_bhld(layout, q, k, v)
  entry = BOLTZMANN_BACKENDS.get(backend)
  # The sample's tile grid is the kernel's (the sample must be the same whichever
  # backend runs, so every backend samples on the kernel tiles).
  interpret = entry.name == "pallas_interpret"
  _, bsz = _kernel_settings(interpret, block_sizes, lowering)
  if granularity == "block":
    sample = _sampling.sample_kept_blocks(
        rng, scores, temperature=temperature, sample_ratio=sample_ratio,
        block_q=bsz.block_q, block_k=bsz.block_k)
  else:
    n_keys = scores.shape[-1]
    with_mask = entry.traits["needs_key_mask"](n_keys, _sampling.num_draws(n_keys, sample_ratio))
    sample = _sampling.sample_kept_keys(
        rng, scores, temperature=temperature, sample_ratio=sample_ratio, with_mask=with_mask)
  out = entry.fn(q, k, v, sample, sm_scale=sm_scale, block_sizes=bsz, lowering=lowering)
  return _from_bhld(layout, out)


def token_selection_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    relevance: jax.Array,
    *,
    num_selected: int,
    threshold: float | None = None,
    backend: str = "auto",
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    sm_scale: float | None = None,
    layout: str = "BHLD",
) -> jax.Array:
  """SemCLIP attention: queries attend only to the most relevant visual tokens.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (or BLHD with layout='BLHD').
    relevance: [B, N] or [B, Hs, N] per-token relevance (e.g.
      `pallas_kernels.token_selection.cosine_relevance`); not differentiated.
    num_selected: k of top-k, or the budget when `threshold` is given.
    threshold: keep tokens with relevance >= threshold (at least one, at most
      num_selected).
  Returns:
    Attention output shaped like q.
  """
  q, k, v = _to_bhld(layout, q, k, v)
  entry = TOKEN_SELECTION_BACKENDS.get(backend)
  if threshold is None:
    indices, counts = _tokens.select_top_k(relevance, num_selected)
  else:
    indices, counts = _tokens.select_by_budget(
        relevance, max_tokens=num_selected, threshold=threshold)
  out = entry.fn(q, k, v, indices, counts, sm_scale=sm_scale, block_sizes=block_sizes, lowering=lowering)
  return _from_bhld(layout, out)


def boltzmann_attend_from_config(config: SparseAttentionConfig, q, k, v, scores, *,
                                 rng: jax.Array, layer: int, sm_scale: float | None = None):
  """`boltzmann_attend` with every choice taken from the config (T from the layer)."""
  return boltzmann_attend(
      q, k, v, scores, rng=rng, layer=layer, t0=config.t0, sample_ratio=config.sample_ratio,
      granularity=config.granularity, backend=config.backend,
      block_sizes=config.block_sizes(), lowering=config.lowering, sm_scale=sm_scale,
      layout=config.layout)


def token_selection_attend_from_config(config: SparseAttentionConfig, q, k, v, relevance, *,
                                       sm_scale: float | None = None):
  """`token_selection_attend` with every choice taken from the config."""
  if config.num_selected is None:
    raise ValueError("SparseAttentionConfig.num_selected must be set for token selection.")
  return token_selection_attend(
      q, k, v, relevance, num_selected=config.num_selected, threshold=config.threshold,
      backend=config.backend, block_sizes=config.block_sizes(), lowering=config.lowering,
      sm_scale=sm_scale, layout=config.layout)


def boltzmann_attend_mask(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    backend: str = "auto",
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    sm_scale: float | None = None,
    layout: str = "BHLD",
) -> jax.Array:
  """Attention restricted to a GIVEN keep mask, through the Boltzmann backends.

  For callers that sample themselves (BoltzFormer's decoder samples against its
  predicted masks with its own rules, `mlx_med.seg.sampling.keep_mask`) and
  want the sparse kernels for the attention only. The mask reaches each backend
  in the form it reads: the XLA fallback takes it as is (dense masked
  formulation); the kernels (and the reference, which reads it back) take the
  block-sparse layout built on the kernel tiles.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (or BLHD with layout='BLHD').
    mask: bool [B, Q, N] (shared by all heads) or [B, Hs, Q, N] (Hs dividing
      H); True = attend. Rows with nothing kept attend everywhere.
    backend: see module docstring.
  Returns:
    Attention output shaped like q.
  """
  q, k, v = _to_bhld(layout, q, k, v)
  mask = _sampling._as_4d(mask, "mask").astype(jnp.bool_)
  if mask.shape[0] != q.shape[0] or mask.shape[2:] != (q.shape[2], k.shape[2]):
    raise ValueError(
        f"mask shape {mask.shape} does not fit q {q.shape} / k {k.shape}; expected"
        f" [batch, (heads,) queries, keys] = [{q.shape[0]}, ..., {q.shape[2]}, {k.shape[2]}].")
  if q.shape[1] % mask.shape[1]:
    raise ValueError(f"mask heads {mask.shape[1]} must divide q heads {q.shape[1]}.")
  entry = BOLTZMANN_BACKENDS.get(backend)
  interpret = entry.name == "pallas_interpret"
  _, bsz = _kernel_settings(interpret, block_sizes, lowering)
  if entry.name == "xla":
    sample = mask
  else:
    sample = _sampling.block_sparse_layout_from_mask(mask, block_q=bsz.block_q, block_k=bsz.block_k)
  out = entry.fn(q, k, v, sample, sm_scale=sm_scale, block_sizes=bsz, lowering=lowering)
  return _from_bhld(layout, out)

